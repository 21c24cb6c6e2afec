//! A file with mode 0600 is never readable by others at any moment: it is
//! created with its final mode before its first byte, even under umask 000.

use std::os::unix::fs::PermissionsExt;

use homelab_agent_tests::{run_watching_modes, Lab};

fn write_repo(lab: &Lab, secret: &str) {
    lab.write(
        "hosts/lab.yaml",
        "platform: linux\nroots: [/srv]\nmodules:\n  - name: secrets\n",
    );
    let mut module = String::from("resources:\n  - directory: /srv/private\n    mode: \"0700\"\n  - directory: /srv/shared\n    mode: \"0755\"\n");
    for i in 0..300 {
        module.push_str(&format!(
            "  - file: /srv/shared/key{i:03}\n    content: \"{secret} {i}\\n\"\n    mode: \"0600\"\n"
        ));
    }
    lab.write("modules/secrets/module.yaml", &module);
}

/// Runs apply under umask 000 while a watcher lists the directory as fast
/// as it can; returns every (name, mode) seen with group/other bits.
fn apply_watching(lab: &Lab) -> Vec<(String, u32)> {
    let dir = lab.host_path("/srv/shared");
    std::fs::create_dir_all(&dir).unwrap();
    let (repo, root) = (lab.repo(), lab.root());
    run_watching_modes(
        &[
            "apply",
            "--repo",
            repo.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
            "--host",
            "lab",
        ],
        &dir,
    )
}

#[test]
fn a_0600_file_is_never_readable_by_others_while_it_is_written() {
    let lab = Lab::empty();
    write_repo(&lab, "first");
    // The sandbox directory itself was made by the test; make it traversable only.
    let exposed = apply_watching(&lab);
    assert!(
        exposed.is_empty(),
        "files seen with group/other bits during create: {exposed:?}"
    );
    for i in 0..300 {
        let path = lab.host_path(&format!("/srv/shared/key{i:03}"));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // Replacing content goes through a temp file: the same rule holds.
    write_repo(&lab, "rotated");
    let exposed = apply_watching(&lab);
    assert!(
        exposed.is_empty(),
        "files seen with group/other bits during replace: {exposed:?}"
    );
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/shared/key007")).unwrap(),
        "rotated 7\n"
    );
    // Directories too get their exact mode despite the umask.
    assert_eq!(
        std::fs::metadata(lab.host_path("/srv/private"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
}
