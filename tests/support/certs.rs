//! A test CA and a server certificate for `127.0.0.1` and `localhost`, made at test time
//! with `openssl` (Debian's, installed by `scripts/test` when missing), in a private temp
//! directory removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The files of a test PKI.
pub struct TestCerts {
    dir: PathBuf,
}

impl TestCerts {
    /// Makes a CA (EC P-256) and a server certificate it signed.
    pub fn new() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "thinws-certs-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl is needed for the TLS tests (scripts/test installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=thinws test CA",
            ],
        ]
        .concat());
        run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "key.pem",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat());
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        // HAProxy wants the certificate and its key in one file.
        let both = [
            std::fs::read(dir.join("cert.pem")).unwrap(),
            std::fs::read(dir.join("key.pem")).unwrap(),
        ]
        .concat();
        std::fs::write(dir.join("both.pem"), both).unwrap();
        TestCerts { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA's certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.ca()).unwrap()
    }

    /// The server's certificate (PEM).
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// The server's key (PEM).
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    /// The certificate and the key in one PEM file.
    pub fn cert_and_key(&self) -> PathBuf {
        self.dir.join("both.pem")
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
