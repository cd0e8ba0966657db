//! The user docs name only what the repository has: every relative link in README.md and
//! docs/*.md points at a file or directory that exists (and at a heading that exists, when it
//! names one), and every repository path written in backticks (`deploy/stack.yml`,
//! `tests/tests/cluster*.rs`, `router-agent/fuzz/`) exists. Needs neither root nor Docker.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

/// The workspace root: this crate lives in `<root>/tests`.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate has a parent directory")
        .to_path_buf()
}

/// README.md and every Markdown file under docs/.
fn doc_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md")];
    if let Ok(entries) = fs::read_dir(root.join("docs")) {
        for entry in entries {
            let path = entry.expect("listing docs/").path();
            if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Where a document's text is prose and where it is code.
enum Piece<'a> {
    Prose(&'a str),
    Code(&'a str),
}

/// Splits a Markdown text into prose and code (fenced blocks, inline spans of one or more
/// backticks).
fn pieces(text: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            out.push(Piece::Code(line));
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find('`') {
            let ticks = rest[start..].bytes().take_while(|&b| b == b'`').count();
            let fence = &rest[start..start + ticks];
            let after = &rest[start + ticks..];
            let Some(end) = after.find(fence) else {
                break;
            };
            out.push(Piece::Prose(&rest[..start]));
            out.push(Piece::Code(&after[..end]));
            rest = &after[end + ticks..];
        }
        out.push(Piece::Prose(rest));
    }
    out
}

/// Targets of inline links `[text](target)` and of reference definitions `[name]: target`.
fn link_targets(prose: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut rest = prose;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        // `[text](target "title")`: the target is the first word.
        if let Some(target) = after[..end].split_whitespace().next() {
            targets.push(target.to_owned());
        }
        rest = &after[end..];
    }
    let trimmed = prose.trim_start();
    if trimmed.starts_with('[')
        && let Some((_, target)) = trimmed.split_once("]: ")
    {
        targets.push(target.trim().to_owned());
    }
    targets
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces made hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (duplicates numbered as GitHub does).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence || !line.starts_with('#') {
            continue;
        }
        let base = slug(line.trim_start_matches('#'));
        let mut anchor = base.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// Words of a code span that are paths inside the repository: they start with one of its
/// top-level entries followed by a slash (`deploy/stack.yml`, `.ci/run`, `tests/`).
fn repo_paths(code: &str, top_level: &BTreeSet<String>) -> Vec<String> {
    code.split(|c: char| c.is_whitespace() || "()[]{},;:\"'=<>|`".contains(c))
        .map(|word| word.trim_end_matches(['.', ',']))
        .filter(|word| {
            word.split_once('/')
                .is_some_and(|(first, _)| top_level.contains(first))
        })
        .map(str::to_owned)
        .collect()
}

/// Whether `path` (relative to `root`) exists; a `*` in its last component matches any run of
/// characters (`tests/tests/cluster*.rs`), and at least one file must match.
fn exists(root: &Path, path: &str) -> bool {
    let Some((dir, pattern)) = path.rsplit_once('/').filter(|_| path.contains('*')) else {
        return root.join(path).exists();
    };
    let Some((prefix, suffix)) = pattern.split_once('*') else {
        return false;
    };
    fs::read_dir(root.join(dir)).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.len() >= prefix.len() + suffix.len()
                && name.starts_with(prefix)
                && name.ends_with(suffix)
        })
    })
}

/// Checks one link target of `file`; returns what is wrong with it.
fn check_link(file: &Path, target: &str) -> Option<String> {
    if target.contains("://") || target.starts_with("mailto:") {
        return None;
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let resolved = if path.is_empty() {
        file.to_path_buf()
    } else {
        file.parent()
            .expect("a doc file has a directory")
            .join(path)
    };
    if !resolved.exists() {
        return Some(format!(
            "link to {target}: {} does not exist",
            resolved.display()
        ));
    }
    let anchor = anchor?;
    if resolved.extension().is_none_or(|e| e != "md") {
        return None;
    }
    let text = fs::read_to_string(&resolved).expect("reading a linked Markdown file");
    (!anchors(&text).contains(anchor)).then(|| {
        format!(
            "link to {target}: no heading with anchor #{anchor} in {}",
            resolved.display()
        )
    })
}

fn top_level_entries(root: &Path) -> BTreeSet<String> {
    fs::read_dir(root)
        .expect("listing the repository root")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        // Build output, not part of the repository.
        .filter(|name| name != "target" && name != ".git")
        .collect()
}

#[test]
fn docs_name_only_what_the_repository_has() {
    let root = repo_root();
    let top_level = top_level_entries(&root);
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in doc_files(&root) {
        let text =
            fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let name = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .display()
            .to_string();
        for piece in pieces(&text) {
            match piece {
                Piece::Prose(prose) => {
                    for target in link_targets(prose) {
                        checked += 1;
                        if let Some(problem) = check_link(&file, &target) {
                            problems.push(format!("{name}: {problem}"));
                        }
                    }
                }
                Piece::Code(code) => {
                    for path in repo_paths(code, &top_level) {
                        checked += 1;
                        if !exists(&root, &path) {
                            problems.push(format!("{name}: `{path}` is not in the repository"));
                        }
                    }
                }
            }
        }
    }
    problems.sort();
    problems.dedup();
    assert!(
        problems.is_empty(),
        "the docs name {} thing(s) the repository does not have:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
    // A parser that found nothing would pass vacuously.
    assert!(
        checked > 20,
        "only {checked} links and paths found in the docs"
    );
}

/// The checker itself: each rule catches what it is for.
#[test]
fn the_checker_finds_what_is_missing() {
    let root = repo_root();
    let top_level = top_level_entries(&root);
    let text = "See [deploy](deploy/) and [gone](docs/gone.md).\n\
                Run `docker-compose -f deploy/compose.yml up -d` or `tests/tests/nothing.rs`.\n\
                ```\n$ cargo run -p tests --bin x tests/src/lib.rs\n```\n\
                A `[not a link](nowhere.md)` in code.\n";
    let mut links = Vec::new();
    let mut paths = Vec::new();
    for piece in pieces(text) {
        match piece {
            Piece::Prose(p) => links.extend(link_targets(p)),
            Piece::Code(c) => paths.extend(repo_paths(c, &top_level)),
        }
    }
    assert_eq!(links, ["deploy/", "docs/gone.md"]);
    assert_eq!(
        paths,
        [
            "deploy/compose.yml",
            "tests/tests/nothing.rs",
            "tests/src/lib.rs"
        ]
    );
    assert!(exists(&root, "deploy/compose.yml"));
    assert!(exists(&root, "tests/tests/cluster*.rs"));
    assert!(!exists(&root, "tests/tests/nothing.rs"));
    assert!(!exists(&root, "tests/tests/nothing*.rs"));
    let readme = root.join("README.md");
    assert!(check_link(&readme, "deploy/compose.yml").is_none());
    assert!(check_link(&readme, "docs/gone.md").is_some());
    assert!(check_link(&readme, "https://example.com/x").is_none());
    assert_eq!(slug(" Restarts without a gap"), "restarts-without-a-gap");
    assert_eq!(slug(" `tcp://` routes"), "tcp-routes");
    let headings = anchors("# A\n## Labels\n```\n# not a heading\n```\n## Labels\n");
    assert!(headings.contains("labels") && headings.contains("labels-1"));
    assert!(!headings.contains("not-a-heading"));
}
