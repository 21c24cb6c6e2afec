//! Test helper: opens a state directory read-write like a running `agent
//! apply`, commits one record, says `ready`, and waits to be killed. Used to
//! leave a state database exactly as a SIGKILLed agent leaves it.

use std::io::Write;

use homelab_agent_state::{InventoryEntry, Lock, Origin, Store};

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .expect("usage: hold-state STATE_DIR");
    let dir = std::path::Path::new(&dir);
    let _lock = Lock::acquire(dir, "hold-state (test helper)").unwrap();
    let store = Store::open(dir).unwrap();
    store
        .write("lab", |w| {
            w.put_inventory(
                "file:/srv/held",
                &InventoryEntry {
                    kind: "file".into(),
                    module: "held".into(),
                    digest: None,
                    origin: Origin::Created,
                    held_secrets: false,
                    rolled_back: None,
                },
            )
        })
        .unwrap();
    println!("ready");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(60));
}
