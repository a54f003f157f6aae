//! `ewsgate check` refuses what the proxy would refuse when it builds its state from the
//! config bundle, so a config that passes `check` never leaves the proxy unable to start.

use std::{fs, path::Path, process::Command};

use tests::lab::ewsgate_bin;

fn certificate(dir: &Path, names: Vec<String>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(names).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ewsgate test");
    let cert = params.self_signed(&key).unwrap();
    fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
}

fn check(dir: &Path, upstream: &str) -> (bool, String) {
    let config = dir.join("ewsgate.toml");
    fs::write(
        &config,
        format!(
            "[proxy]\nlisten = [\"192.0.2.10:443\"]\ncertificate = \"cert.pem\"\n\
             private_key = \"key.pem\"\n{upstream}\n"
        ),
    )
    .unwrap();
    let out = Command::new(ewsgate_bin())
        .arg("--config")
        .arg(&config)
        .arg("check")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn check_refuses_what_the_proxy_would_refuse() {
    let dir = std::env::temp_dir().join(format!("ewsgate-check-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let https = "upstream = \"https://mail.example.org\"\nupstream_ca = \"ca.pem\"";

    certificate(&dir, vec!["mail.example.org".into()]);
    let (ok, text) = check(&dir, https);
    assert!(ok, "a good config with an https upstream: {text}");

    let (ok, text) = check(
        &dir,
        "upstream = \"https://mail.example.org\"\nupstream_ca = \"no.pem\"",
    );
    assert!(
        !ok && text.contains("no.pem") && text.contains(":6:"),
        "{text}"
    );

    certificate(&dir, Vec::new());
    let (ok, text) = check(&dir, https);
    assert!(!ok && text.contains("names no DNS host"), "{text}");

    fs::remove_dir_all(&dir).unwrap();
}
