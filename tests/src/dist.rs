//! The release artifacts `scripts/release.sh` builds (`tests/tests/release.rs`
//! checks them). They are not built by the tests: a fully optimised build
//! takes minutes, so `.ci/run` runs the script once before `cargo test` and
//! exports `HOMELAB_DIST`. A missing artifact fails the test and says how to
//! build it; nothing is skipped.

use std::path::{Path, PathBuf};

/// The glibc floor the portable binary is built against (scripts/release.sh).
pub const GLIBC_FLOOR: (u32, u32) = (2, 17);

/// The rust target the portable binary is built for, glibc floor included.
pub const TARGET: &str = "x86_64-unknown-linux-gnu.2.17";

const HOW: &str = "build the release artifacts first: `bash scripts/release.sh` \
(writes target/dist/; ~10 min cold on two cores), or point HOMELAB_DIST at a folder it wrote";

/// The artifact folder: `$HOMELAB_DIST`, else `target/dist` of the workspace.
pub fn dir() -> PathBuf {
    let dir = std::env::var_os("HOMELAB_DIST")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace().join("target/dist"));
    assert!(
        dir.join("SHA256SUMS").is_file(),
        "no release artifacts in {} (no SHA256SUMS): {HOW}",
        dir.display()
    );
    dir
}

/// The one file directly in the artifact folder whose name matches.
pub fn find(what: &str, matches: impl Fn(&str) -> bool) -> PathBuf {
    let dir = dir();
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| matches(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    assert!(
        found.len() == 1,
        "expected one {what} in {}, found {found:?}: {HOW}",
        dir.display()
    );
    found.into_iter().next().unwrap()
}

/// The portable binary (`homelab-agent-VERSION-x86_64-linux-gnu`).
pub fn binary() -> PathBuf {
    find("portable binary (homelab-agent-*-x86_64-linux-gnu)", |n| {
        n.starts_with("homelab-agent-") && n.ends_with("-x86_64-linux-gnu")
    })
}

/// The Debian package (`homelab-agent_VERSION-1_amd64.deb`).
pub fn deb() -> PathBuf {
    find(".deb (homelab-agent_*_amd64.deb)", |n| {
        n.starts_with("homelab-agent_") && n.ends_with("_amd64.deb")
    })
}

/// A file under the artifact folder (`completions/agent.bash`, ...).
pub fn file(rel: &str) -> PathBuf {
    let p = dir().join(rel);
    assert!(p.is_file(), "{} is missing: {HOW}", p.display());
    p
}

/// The GLIBC_x.y versions an ELF file requires (from `.gnu.version_r`), and
/// the libraries it needs (`DT_NEEDED`), read with the `object` crate.
#[derive(Debug, Default)]
pub struct ElfFacts {
    pub glibc: Vec<(u32, u32)>,
    /// Every required version name, as `file: NAME`.
    pub required: Vec<String>,
    pub needed: Vec<String>,
    pub machine_x86_64: bool,
    /// Has a `.symtab` (not stripped).
    pub symtab: bool,
}

/// Reads [`ElfFacts`] of `path`.
pub fn elf_facts(path: &Path) -> ElfFacts {
    use object::read::elf::{Dyn, ElfFile64, FileHeader};
    use object::{Endianness, Object};

    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let elf = ElfFile64::<Endianness>::parse(&*data)
        .unwrap_or_else(|e| panic!("{} is not a 64-bit ELF file: {e}", path.display()));
    let endian = elf.endian();
    let header = elf.elf_header();
    let sections = elf.elf_section_table();
    let mut facts = ElfFacts {
        machine_x86_64: header.e_machine(endian) == object::elf::EM_X86_64,
        symtab: elf.section_by_name(".symtab").is_some(),
        ..ElfFacts::default()
    };
    // (The index returned is the section's link: its string table.)
    if let Some((mut needs, link)) = sections.gnu_verneed(endian, &*data).expect("verneed") {
        let strings = sections.strings(endian, &*data, link).expect("strings");
        while let Some((need, mut aux)) = needs.next().expect("verneed entry") {
            let file = String::from_utf8_lossy(need.file(endian, strings).expect("file"));
            while let Some(a) = aux.next().expect("vernaux entry") {
                let name = String::from_utf8_lossy(a.name(endian, strings).expect("name"));
                if let Some(v) = name.strip_prefix("GLIBC_") {
                    let mut parts = v.split('.').map(|p| p.parse::<u32>());
                    match (parts.next(), parts.next()) {
                        (Some(Ok(major)), Some(Ok(minor))) => facts.glibc.push((major, minor)),
                        (Some(Ok(major)), None) => facts.glibc.push((major, 0)),
                        // GLIBC_PRIVATE and the like: never satisfiable elsewhere.
                        _ => facts.glibc.push((u32::MAX, u32::MAX)),
                    }
                }
                facts.required.push(format!("{file}: {name}"));
            }
        }
    }
    if let Some((dyns, link)) = sections.dynamic(endian, &*data).expect("dynamic") {
        let strings = sections.strings(endian, &*data, link).expect("dynstr");
        for d in dyns {
            if d.tag32(endian) == Some(object::elf::DT_NEEDED as i32) {
                let name = d.string(endian, strings).expect("DT_NEEDED name");
                facts
                    .needed
                    .push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    facts.glibc.sort();
    facts
}
