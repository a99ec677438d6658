//! A private local Redis Cluster per test: 3 masters and 3 replicas (`redis-server
//! --cluster-enabled yes` on free loopback ports, joined by `redis-cli --cluster create
//! --cluster-replicas 1`), with a short `cluster-node-timeout` so that a failover takes
//! about a second. Every server is killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::within;

/// One server of the cluster.
pub struct ClusterNode {
    pub port: u16,
    child: Option<Child>,
    dir: super::TempDir,
    /// With TLS (clients and the cluster bus): the certificate, key and CA files.
    tls: Option<[std::path::PathBuf; 3]>,
}

impl ClusterNode {
    fn spawn(&mut self) {
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some([cert, key, ca]) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "no"]),
        };
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            .args(["--cluster-config-file", "nodes.conf"])
            // Replicas sync at once (Redis waits 5 s by default), so that one can take over
            // from a master killed right after the cluster starts.
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
    }

    /// Waits until the node listens (true) or its process has exited (false), within
    /// [`super::DEADLINE`].
    async fn listens_or_exits(&mut self) -> bool {
        let port = self.port;
        let child = &mut self.child;
        super::eventually(
            &format!("port {port} to listen"),
            super::DEADLINE,
            async || {
                if child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some())
                {
                    *child = None;
                    return Some(false);
                }
                let connected = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
                connected.is_ok().then_some(true)
            },
        )
        .await
    }

    /// SIGSTOP: the server holds its connections and answers nothing.
    pub fn freeze(&self) {
        super::send_signal(self.child.as_ref(), "-STOP");
    }

    /// SIGCONT.
    pub fn thaw(&self) {
        super::send_signal(self.child.as_ref(), "-CONT");
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with its cluster config (it rejoins, as a replica if it was failed
    /// over).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some(_) => format!("rediss://127.0.0.1:{}", self.port),
        }
    }
}

/// The cluster.
pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
    /// redis-cli's TLS arguments, when the cluster speaks TLS.
    tls_args: Vec<String>,
}

fn free_port() -> u16 {
    // Cluster bus ports are port + 10000: keep both free and below 55536.
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A cluster that speaks only TLS (to clients and on its bus), with `certs`' server
    /// certificate.
    pub async fn start_tls(certs: &super::certs::TestCerts) -> Self {
        Self::start_with(Some([certs.cert(), certs.key(), certs.ca()])).await
    }

    async fn start_with(tls: Option<[std::path::PathBuf; 3]>) -> Self {
        let tls_args: Vec<String> = match &tls {
            None => Vec::new(),
            Some([_, _, ca]) => vec![
                "--tls".into(),
                "--cacert".into(),
                ca.to_string_lossy().into_owned(),
            ],
        };
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let dir = super::TempDir::new("cluster");
            let mut node = ClusterNode {
                port: free_port(),
                child: None,
                dir,
                tls: tls.clone(),
            };
            node.spawn();
            nodes.push(node);
        }
        for node in &mut nodes {
            // A node that exited at once lost its port (or its bus port) to another
            // process between `free_port` and its start: it starts again on another.
            while !node.listens_or_exits().await {
                node.port = free_port();
                node.spawn();
            }
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        // Bounded: a cluster whose nodes cannot meet would make redis-cli wait forever.
        let out = Command::new("timeout")
            .args(["60", "redis-cli"])
            .args(&tls_args)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes, tls_args };
        cluster.wait_ok().await;
        cluster
    }

    /// Waits until every live node says `cluster_state:ok` and knows 3 masters with slots.
    pub async fn wait_ok(&self) {
        within("the cluster to be ok", async {
            loop {
                let mut ok = true;
                for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                    let info = self.cli(node.port, &["cluster", "info"]);
                    if !info.contains("cluster_state:ok")
                        || !info.contains("cluster_slots_assigned:16384")
                    {
                        ok = false;
                    }
                }
                if ok {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
    }

    /// The seed URLs (every node).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(ClusterNode::url).collect()
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        self.cli(self.nodes[0].port, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap()
    }

    /// The cluster id of node `n` (`CLUSTER MYID`).
    pub fn id(&self, n: usize) -> String {
        self.cli(self.nodes[n].port, &["cluster", "myid"])
            .trim()
            .to_owned()
    }

    /// The replica of master `master`.
    pub fn replica_of(&self, master: usize) -> usize {
        let port = self.nodes[master].port.to_string();
        (0..self.nodes.len())
            .find(|&n| {
                let role = self.cli(self.nodes[n].port, &["role"]);
                let mut lines = role.lines();
                lines.next() == Some("slave") && lines.nth(1) == Some(port.as_str())
            })
            .expect("every master has a replica")
    }

    /// Whether node `n` is a master now.
    pub fn is_master(&self, n: usize) -> bool {
        self.cli(self.nodes[n].port, &["role"])
            .starts_with("master")
    }

    /// Moves one slot, the lowest, from master `from` to master `to` with `redis-cli
    /// --cluster reshard` (on a blocking thread; bounded: a reshard that cannot finish fails
    /// the test instead of hanging it).
    pub async fn reshard_one(&self, from: usize, to: usize) {
        let mut command = Command::new("timeout");
        command
            .args(["60", "redis-cli"])
            .args(&self.tls_args)
            .args([
                "--cluster",
                "reshard",
                &format!("127.0.0.1:{}", self.nodes[from].port),
            ])
            .args([
                "--cluster-from",
                &self.id(from),
                "--cluster-to",
                &self.id(to),
            ])
            .args(["--cluster-slots", "1", "--cluster-yes"]);
        let resharded = tokio::task::spawn_blocking(move || {
            command.output().expect("redis-cli --cluster reshard")
        })
        .await
        .unwrap();
        assert!(
            resharded.status.success(),
            "{}",
            String::from_utf8_lossy(&resharded.stdout)
        );
    }

    /// Where [`RedisCluster::reshard_one`] moves slot 0 (it takes the source's lowest): from
    /// its master to another one.
    pub fn slot_zero_move(&self) -> (usize, usize) {
        let source = self.master_of(0);
        let target = [5500, 11000, 16383]
            .into_iter()
            .map(|slot| self.master_of(slot))
            .find(|&master| master != source)
            .unwrap();
        (source, target)
    }

    /// The index in `nodes` of the master serving `slot`, as `CLUSTER SHARDS` says.
    pub fn master_of(&self, slot: u16) -> usize {
        let live = self.nodes.iter().find(|n| n.child.is_some()).unwrap();
        let slots = self.cli(live.port, &["cluster", "slots"]);
        // redis-cli prints the nested reply flat: start, end, then the master's ip and port.
        let lines: Vec<&str> = slots.lines().map(str::trim).collect();
        let mut i = 0;
        while i + 3 < lines.len() {
            if let (Ok(start), Ok(end)) = (lines[i].parse::<u16>(), lines[i + 1].parse::<u16>()) {
                if lines[i + 2] == "127.0.0.1" {
                    if (start..=end).contains(&slot) {
                        let port: u16 = lines[i + 3].parse().unwrap();
                        return self.nodes.iter().position(|n| n.port == port).unwrap();
                    }
                    i += 4;
                    continue;
                }
            }
            i += 1;
        }
        panic!("no master for slot {slot} in {slots}");
    }
}

impl RedisCluster {
    /// `redis-cli` (with TLS when the cluster speaks it) `-p PORT ARGS…`, its stdout.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(&self.tls_args)
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// `redis-cli -p PORT ARGS…`, its stdout.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            // Its directory goes with it.
            node.kill();
        }
    }
}

/// The Redis Cluster slot of `key` (CRC16-XMODEM of its hash tag, mod 16384), computed
/// here so that a name can be searched for a given slot (checked against `CLUSTER KEYSLOT`).
pub fn slot_of(key: &str) -> u16 {
    let tagged = match (
        key.find('{'),
        key.find('{').and_then(|o| key[o + 1..].find('}')),
    ) {
        (Some(open), Some(len)) if len > 0 => &key[open + 1..open + 1 + len],
        _ => key,
    };
    let mut crc: u16 = 0;
    for byte in tagged.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// A room named `{prefix}{n}` whose channel is in `slot`.
pub fn room_in_slot(prefix: &str, slot: u16) -> String {
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|room| slot_of(&format!("thinws:room:{{{room}}}")) == slot)
        .unwrap()
}
