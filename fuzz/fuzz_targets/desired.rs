//! The desired-state loader (`desired::load_with`) on a small repository
//! built from the input: host file, module file, template, stack and
//! manifest, separated by NUL bytes. Every input ends as a catalog or an
//! error, never a panic, a hang or unbounded memory; an error never carries
//! the value `secret()` returned.
#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;

use homelab_agent::desired::{self, LoadOptions};
use homelab_agent::secrets::resolve::{SecretError, SecretSource};
use homelab_agent::secrets::{Reference, SecretValue};
use homelab_agent::source::{Source, SourceError};
use libfuzzer_sys::fuzz_target;

const FILES: &[&str] = &[
    "hosts/lab.yaml",
    "modules/app/module.yaml",
    "modules/app/templates/x.conf.j2",
    "k8s/web/stack.yaml",
    "k8s/web/m.yaml",
];

/// Unlikely to come out of the fuzzer by chance.
const SECRET: &str = "fz-Q7vX9kLpZ2wT";

struct Memory(BTreeMap<String, Vec<u8>>);

impl Source for Memory {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        Ok(self.0.get(path).cloned())
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, SourceError> {
        let prefix = format!("{dir}/");
        let mut names: Vec<String> = self
            .0
            .keys()
            .filter_map(|p| p.strip_prefix(&prefix))
            .map(|rest| rest.split('/').next().unwrap().to_string())
            .collect();
        names.dedup();
        Ok(names)
    }

    fn revision(&self) -> String {
        "fuzz".into()
    }

    fn describe(&self) -> String {
        "the fuzz input".into()
    }
}

struct Fixed;

impl SecretSource for Fixed {
    fn resolve(&self, _: &Reference) -> Result<SecretValue, SecretError> {
        Ok(SecretValue::new(SECRET))
    }
}

fuzz_target!(|data: &[u8]| {
    let files: BTreeMap<String, Vec<u8>> = FILES
        .iter()
        .zip(data.split(|b| *b == 0))
        .map(|(name, bytes)| (name.to_string(), bytes.to_vec()))
        .collect();
    let opts = LoadOptions {
        secrets: Arc::new(Fixed),
        ..LoadOptions::default()
    };
    let result = desired::load_with(Arc::new(Memory(files)), "lab", &opts);
    if let Err(e) = result {
        let text = e.to_string();
        let input = String::from_utf8_lossy(data);
        if !input.contains(SECRET) {
            for form in [SECRET.to_string(), SECRET.to_uppercase(), SECRET.to_lowercase()] {
                assert!(!text.contains(&form), "secret value in an error:\n{text}");
            }
        }
    }
});
