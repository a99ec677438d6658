//! A test CA and a server certificate for `127.0.0.1` and `localhost`, made at test time
//! with `openssl` (Debian's, installed by `scripts/test` when missing), in a private temp
//! directory removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The files of a test PKI.
pub struct TestCerts {
    dir: super::TempDir,
}

impl TestCerts {
    /// Makes a CA (EC P-256) and a server certificate it signed.
    pub fn new() -> Self {
        let dir = super::TempDir::new("certs");
        let run = |args: &[&str]| openssl(dir.path(), args);
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
        dir.file(
            "ext.cnf",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n",
        );
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
        dir.file("both.pem", both);
        TestCerts { dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
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

/// A key pair for signing tokens, made in `dir` by `openssl genpkey -algorithm {algorithm}
/// -pkeyopt {option}` (`"EC", "ec_paramgen_curve:P-256"` for ES256, `"RSA",
/// "rsa_keygen_bits:2048"` for RS256): its private key (PKCS#8 PEM) and its public key (PEM).
pub fn key_pair(dir: &super::TempDir, algorithm: &str, option: &str) -> (PathBuf, PathBuf) {
    let (private, public) = (format!("{algorithm}.pem"), format!("{algorithm}.pub.pem"));
    openssl(
        dir.path(),
        &[
            "genpkey",
            "-algorithm",
            algorithm,
            "-pkeyopt",
            option,
            "-out",
            &private,
        ],
    );
    openssl(
        dir.path(),
        &["pkey", "-in", &private, "-pubout", "-out", &public],
    );
    (dir.join(&private), dir.join(&public))
}

/// Runs `openssl` with `args` in `dir`, which must succeed.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed for the TLS tests (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
