//! The YAML reader (`desired::yaml`): any text is either a tree or
//! diagnostics naming the file, never a panic, a hang or unbounded memory
//! (libFuzzer's -timeout and -rss_limit_mb, set by run.sh, catch those).
#![no_main]

use homelab_agent::desired::yaml;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match yaml::parse_all("f.yaml", text) {
        Ok(docs) => {
            // What the loader does next with a tree: template values and
            // map decoding.
            for doc in &docs {
                let _ = doc.to_template_value();
                let mut diags = Default::default();
                if let Some(reader) = yaml::MapReader::new("f.yaml", "the document", doc, &mut diags) {
                    reader.finish(&["a", "b"], &mut diags);
                }
            }
        }
        Err(diags) => {
            assert!(!diags.is_empty());
            for d in diags.iter() {
                assert_eq!(d.file, "f.yaml");
                assert!(d.line.is_some(), "no line: {d}");
            }
        }
    }
});
