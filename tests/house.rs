//! The house stays so: imports run one way, down the floors of HOUSE.md, and no source file
//! grows past the line limit. Reads the sources under `src/` (not `src/bin/`), std only.
//!
//! - [`imports_run_downward`]: every `crate::` path a module names (in `use` trees, grouped or
//!   not, and inline, as in `crate::limit::foo(..)`), and every `super::` path, is resolved to
//!   the module it reaches and placed on a floor; a module may name only floors below its own,
//!   its own box (folder or file), or a listed sideways edge. Comments, doc links and string
//!   literals do not count; imports in test code do (they are marked as such).
//! - [`no_source_file_is_over_the_line_limit`]: a source file has at most [`MAX_LINES`]
//!   lines, not counting test files (`tests.rs`, or under a `tests/` folder of `src/`) nor a
//!   `#[cfg(test)] mod tests { .. }` that ends the file.
//!
//! Either test fails with the full list of what breaks the rule: run
//! `cargo nextest run --test house` (or `cargo test --test house`) to see it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

/// The floors, from HOUSE.md "Target floors": each module imports only from floors below it.
/// A key is a module path and names one box; a folder's box holds every module under it, and
/// the longest key that matches a path wins (so `proxy::inflight` is its own box, a leaf
/// below the rest of `proxy`). `lib` and `main` are the two crate roots. A new top-level
/// module must be placed here, or the import check fails naming it.
const FLOORS: &[(&str, u8)] = &[
    // 1: configuration; imports nothing of the crate. Per-request byte strings (header values,
    // error bodies) on shared bytes (a leaf).
    ("config", 1),
    ("header_bytes", 1),
    // 2: request ids, metrics, access log, logging.
    ("observability", 2),
    // 3: the max_inflight gate and its slot; which worker thread this is (a leaf the
    // upstream pools shard their idle connections by).
    ("proxy::inflight", 3),
    ("server::workers", 3),
    // 4: GatewayError, FailureKind, the renderer.
    ("error", 4),
    // 5: RequestBody, ResponseBody.
    ("body", 5),
    // 6: the boxes of the request flow; they never import the stack.
    ("route", 6),
    ("auth", 6),
    ("limit", 6),
    ("proxy", 6),
    ("server", 6),
    // 7: Snapshot, Gateway: the pipeline.
    ("stack", 7),
    // 8: the CLI and reloading, over everything.
    ("reload", 8),
    ("main", 8),
    ("lib", 8),
];

/// Imports between two boxes of one floor that the house allows: a key record owns its
/// buckets, for cache locality.
const SIDEWAYS: &[(&str, &str)] = &[("auth", "limit")];

/// The most lines a source file may have, its tests apart.
const MAX_LINES: usize = 700;

#[test]
fn imports_run_downward() {
    let sources = read_sources();
    let found = import_violations(&sources);
    if !found.is_empty() {
        panic!("{}", render_imports(&found));
    }
}

#[test]
fn no_source_file_is_over_the_line_limit() {
    let sources = read_sources();
    let found = line_violations(&sources);
    if !found.is_empty() {
        panic!("{}", render_lines(&found));
    }
}

/// One file of `src/`: its path as `src/...` with `/` separators, and its text.
struct Source {
    path: String,
    text: String,
}

fn read_sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = Vec::new();
    let mut pending = vec![root.join("src")];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            let relative = path.strip_prefix(root).expect("under the crate");
            let name = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            if path.is_dir() {
                if name != "src/bin" {
                    pending.push(path);
                }
            } else if name.ends_with(".rs") {
                let text = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                sources.push(Source { path: name, text });
            }
        }
    }
    sources.sort_by(|a, b| a.path.cmp(&b.path));
    sources
}

// ---------------------------------------------------------------------------------------------
// Imports

/// One import that runs up the floors, or sideways without leave.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Upward {
    file: String,
    line: usize,
    /// The box the path reaches, and its floor.
    to: String,
    to_floor: u8,
    /// The box of the importing file, and its floor.
    from: String,
    from_floor: u8,
    /// The path as resolved from the crate root, `crate::...`.
    path: String,
    /// In a test module or test file.
    test: bool,
}

/// What breaks the import rule: upward or unlisted sideways imports, and source files that are
/// on no floor.
#[derive(Debug, Default)]
struct ImportViolations {
    upward: Vec<Upward>,
    unplaced: Vec<String>,
}

impl ImportViolations {
    fn is_empty(&self) -> bool {
        self.upward.is_empty() && self.unplaced.is_empty()
    }
}

fn import_violations(sources: &[Source]) -> ImportViolations {
    let modules: BTreeSet<Vec<String>> = sources.iter().map(|s| module_path(&s.path)).collect();
    let reexports = sources
        .iter()
        .find(|s| s.path == "src/lib.rs")
        .map(|lib| root_reexports(lib, &modules))
        .unwrap_or_default();
    let mut found = ImportViolations::default();
    for source in sources {
        let Some((from, from_floor)) = place_file(&source.path) else {
            found.unplaced.push(source.path.clone());
            continue;
        };
        let test_file = is_test_file(&source.path);
        let mut seen = BTreeSet::new();
        for reference in references(&source.text) {
            let here = [module_path(&source.path), reference.inline_modules.clone()].concat();
            let Some(mut target) = resolve(&reference.segments, &here, &modules) else {
                continue;
            };
            if let Some(first) = target.first()
                && !modules.iter().any(|m| m.first() == Some(first))
                && let Some(full) = reexports.get(first)
            {
                target = [full.clone(), target[1..].to_vec()].concat();
            }
            let Some((to, to_floor)) = place(&target) else {
                continue;
            };
            let allowed = to == from
                || to_floor < from_floor
                || (to_floor == from_floor && SIDEWAYS.contains(&(from, to)));
            if allowed {
                continue;
            }
            let upward = Upward {
                file: source.path.clone(),
                line: reference.line,
                to: to.to_string(),
                to_floor,
                from: from.to_string(),
                from_floor,
                path: format!("crate::{}", target.join("::")),
                test: test_file || reference.in_test,
            };
            if seen.insert((upward.line, upward.path.clone())) {
                found.upward.push(upward);
            }
        }
    }
    found
}

fn render_imports(found: &ImportViolations) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nThe house (HOUSE.md, tests/house.rs FLOORS): each module imports only from floors \
         below its own.\n"
    );
    for file in &found.unplaced {
        let _ = writeln!(out, "{file} is on no floor: place it in FLOORS");
    }
    let mut edges: BTreeMap<(String, String), usize> = BTreeMap::new();
    for u in &found.upward {
        let sideways = if u.to_floor == u.from_floor {
            format!(" (sideways, {} -> {})", u.from, u.to)
        } else {
            String::new()
        };
        let test = if u.test { " [test code]" } else { "" };
        let _ = writeln!(
            out,
            "{}:{} imports {} (floor {}) from floor {}{sideways}: {}{test}",
            u.file, u.line, u.to, u.to_floor, u.from_floor, u.path
        );
        *edges.entry((u.from.clone(), u.to.clone())).or_default() += 1;
    }
    if !found.upward.is_empty() {
        let _ = writeln!(
            out,
            "\n{} imports against the floors, {} edges between boxes:",
            found.upward.len(),
            edges.len()
        );
        for ((from, to), n) in &edges {
            let _ = writeln!(out, "  {from} -> {to}: {n}");
        }
    }
    out
}

/// A module's path from its file: `src/limit/bucket.rs` is `limit::bucket`, `src/proxy/mod.rs`
/// is `proxy`, the crate roots are empty.
fn module_path(file: &str) -> Vec<String> {
    let inner = file.strip_prefix("src/").unwrap_or(file);
    let inner = inner.strip_suffix(".rs").unwrap_or(inner);
    let mut segments: Vec<String> = inner.split('/').map(str::to_string).collect();
    if segments.last().is_some_and(|s| s == "mod") {
        segments.pop();
    }
    if segments == ["lib"] || segments == ["main"] {
        segments.clear();
    }
    segments
}

/// A file's box and floor.
fn place_file(file: &str) -> Option<(&'static str, u8)> {
    match file {
        "src/lib.rs" => place_key("lib"),
        "src/main.rs" => place_key("main"),
        _ => place(&module_path(file)),
    }
}

fn place_key(key: &str) -> Option<(&'static str, u8)> {
    FLOORS.iter().find(|(k, _)| *k == key).copied()
}

/// The box and floor of a module path: the longest key of [`FLOORS`] it lies under.
fn place(path: &[String]) -> Option<(&'static str, u8)> {
    if path.is_empty() {
        return None;
    }
    let joined = path.join("::");
    FLOORS
        .iter()
        .filter(|(key, _)| {
            *key != "lib"
                && *key != "main"
                && (joined == *key || joined.starts_with(&format!("{key}::")))
        })
        .max_by_key(|(key, _)| key.len())
        .copied()
}

fn is_test_file(file: &str) -> bool {
    file.ends_with("/tests.rs") || file.contains("/tests/")
}

/// Names the crate root re-exports (`pub use config::Config;` in lib.rs), with the path each
/// stands for, so `crate::Config` is placed where `Config` lives.
fn root_reexports(lib: &Source, modules: &BTreeSet<Vec<String>>) -> BTreeMap<String, Vec<String>> {
    let mut names = BTreeMap::new();
    for reference in references(&lib.text) {
        if !reference.in_use || !reference.inline_modules.is_empty() {
            continue;
        }
        if let Some(path) = resolve(&reference.segments, &[], modules)
            && let Some(name) = reference.alias.clone().or_else(|| path.last().cloned())
            && path.len() > 1
        {
            names.insert(name, path);
        }
    }
    names
}

/// The path from the crate root that `segments`, written in module `here`, names; `None` for
/// paths into other crates.
fn resolve(
    segments: &[String],
    here: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let first = segments.first()?;
    match first.as_str() {
        "crate" => Some(segments[1..].to_vec()),
        "self" => Some([here, &segments[1..]].concat()),
        "super" => {
            let mut base = here.to_vec();
            let mut rest = segments;
            while rest.first().is_some_and(|s| s == "super") {
                base.pop()?;
                rest = &rest[1..];
            }
            Some([base.as_slice(), rest].concat())
        }
        // A `use` may name a child module without `self::` (2018 paths).
        _ => {
            let child = [here, &segments[..1]].concat();
            modules.contains(&child).then(|| [here, segments].concat())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing: just enough of Rust to find paths.

/// One path a source names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    /// As written: `crate`, `self` or `super` first, or (in a `use`) a child module or crate.
    segments: Vec<String>,
    /// 1-based line of the path's first segment.
    line: usize,
    /// Inside a `use` tree (else an inline path, which starts with `crate` or `super`).
    in_use: bool,
    /// The `as` name of a `use` leaf.
    alias: Option<String>,
    /// The inline `mod name { .. }` blocks around it, outermost first.
    inline_modules: Vec<String>,
    /// Inside an inline module marked `#[cfg(test)]`.
    in_test: bool,
}

/// Every path in `text` that starts with `crate`, `self` or `super`, and every leaf of a `use`
/// tree, outside comments and literals. Leaves ending in `self` name their prefix; globs name
/// the path before `*`.
fn references(text: &str) -> Vec<Reference> {
    let code = code_only(text);
    let tokens = tokenize(&code);
    let newlines: Vec<usize> = code.match_indices('\n').map(|(at, _)| at).collect();
    let line_of = |offset: usize| newlines.partition_point(|&at| at < offset) + 1;
    let modules = inline_modules(&tokens);
    let around = |offset: usize| {
        let mut names = Vec::new();
        let mut test = false;
        for m in modules
            .iter()
            .filter(|m| m.open < offset && offset < m.close)
        {
            names.push(m.name.clone());
            test |= m.test;
        }
        (names, test)
    };
    let mut found = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let token = &tokens[i];
        if token.is_ident("use") && !tokens.get(i + 1).is_some_and(|t| t.is("<")) {
            i += 1;
            let mut leaves = Vec::new();
            parse_use_tree(&tokens, &mut i, &[], &mut leaves);
            for (segments, offset, alias) in leaves {
                let (inline_modules, in_test) = around(offset);
                found.push(Reference {
                    segments,
                    line: line_of(offset),
                    in_use: true,
                    alias,
                    inline_modules,
                    in_test,
                });
            }
            continue;
        }
        let root = ["crate", "super", "self"].iter().any(|r| token.is_ident(r));
        // Not the middle of a path, nor `$crate` (a macro's own crate).
        let mid_path = i > 0 && (tokens[i - 1].is("::") || tokens[i - 1].is("$"));
        // `pub(in crate::server)` is a visibility, not a path to an item.
        let visibility = i >= 3
            && tokens[i - 1].is_ident("in")
            && tokens[i - 2].is("(")
            && tokens[i - 3].is_ident("pub");
        let starts_path =
            root && tokens.get(i + 1).is_some_and(|t| t.is("::")) && !mid_path && !visibility;
        if starts_path {
            let offset = token.offset;
            let mut segments = vec![token.text.clone()];
            i += 1;
            while tokens.get(i).is_some_and(|t| t.is("::"))
                && let Some(next) = tokens.get(i + 1).filter(|t| t.ident)
            {
                segments.push(next.text.clone());
                i += 2;
            }
            // `self::x` inline is always this module's own.
            if segments[0] != "self" {
                let (inline_modules, in_test) = around(offset);
                found.push(Reference {
                    segments,
                    line: line_of(offset),
                    in_use: false,
                    alias: None,
                    inline_modules,
                    in_test,
                });
            }
            continue;
        }
        i += 1;
    }
    found
}

/// Reads one use tree from `tokens[*i]`, adding each leaf (path, offset of its first own
/// segment, alias) to `leaves`; stops after the tree (at `,`, `}` or `;`).
fn parse_use_tree(
    tokens: &[Token],
    i: &mut usize,
    prefix: &[String],
    leaves: &mut Vec<(Vec<String>, usize, Option<String>)>,
) {
    let mut segments = prefix.to_vec();
    let mut first_offset = None;
    while let Some(token) = tokens.get(*i) {
        let offset = *first_offset.get_or_insert(token.offset);
        if token.is("{") {
            *i += 1;
            loop {
                match tokens.get(*i) {
                    None => return,
                    Some(t) if t.is("}") => {
                        *i += 1;
                        return;
                    }
                    Some(t) if t.is(",") => *i += 1,
                    Some(t) if t.is(";") => return,
                    Some(_) => {
                        let before = *i;
                        parse_use_tree(tokens, i, &segments, leaves);
                        if *i == before {
                            *i += 1;
                        }
                    }
                }
            }
        } else if token.is("*") {
            *i += 1;
            leaves.push((segments, offset, None));
            return;
        } else if token.is("::") {
            // A leading `::` (a path into another crate).
            *i += 1;
        } else if token.ident {
            segments.push(token.text.clone());
            *i += 1;
            if tokens.get(*i).is_some_and(|t| t.is("::")) {
                *i += 1;
                continue;
            }
            let mut alias = None;
            if tokens.get(*i).is_some_and(|t| t.is_ident("as")) {
                alias = tokens.get(*i + 1).map(|t| t.text.clone());
                *i += 2;
            }
            if segments.last().is_some_and(|s| s == "self") && segments.len() > 1 {
                segments.pop();
            }
            leaves.push((segments, offset, alias));
            return;
        } else {
            return;
        }
    }
}

/// An inline `mod name { .. }`: where its braces are, and whether `#[cfg(test)]` marks it.
#[derive(Debug)]
struct InlineModule {
    name: String,
    /// Offsets of `{` and `}`.
    open: usize,
    close: usize,
    test: bool,
    /// Offset of its `#[cfg(test)]`, if marked.
    cfg_test_at: Option<usize>,
}

fn inline_modules(tokens: &[Token]) -> Vec<InlineModule> {
    let mut done = Vec::new();
    let mut open: Vec<(InlineModule, usize)> = Vec::new();
    let mut depth = 0usize;
    for (i, token) in tokens.iter().enumerate() {
        if token.is("{") {
            depth += 1;
            if i >= 2 && tokens[i - 2].is_ident("mod") && tokens[i - 1].ident {
                let cfg_test_at = cfg_test_before(tokens, i - 2);
                let module = InlineModule {
                    name: tokens[i - 1].text.clone(),
                    open: token.offset,
                    close: usize::MAX,
                    test: cfg_test_at.is_some(),
                    cfg_test_at,
                };
                open.push((module, depth));
            }
        } else if token.is("}") {
            if open.last().is_some_and(|(_, d)| *d == depth) {
                let (mut module, _) = open.pop().expect("checked");
                module.close = token.offset;
                done.push(module);
            }
            depth = depth.saturating_sub(1);
        }
    }
    done.extend(open.into_iter().map(|(m, _)| m));
    done.sort_by_key(|m| m.open);
    done
}

/// The offset of a `#[cfg(test)]` among the attributes and visibility before `tokens[at]`.
fn cfg_test_before(tokens: &[Token], at: usize) -> Option<usize> {
    let mut j = at;
    let mut found = None;
    while j > 0 {
        j -= 1;
        let t = &tokens[j];
        if t.is(";") || t.is("{") || t.is("}") {
            break;
        }
        if t.is_ident("cfg")
            && tokens.get(j + 1).is_some_and(|t| t.is("("))
            && tokens.get(j + 2).is_some_and(|t| t.is_ident("test"))
            && tokens.get(j + 3).is_some_and(|t| t.is(")"))
        {
            // Back to its `#`.
            found = Some(tokens[j.saturating_sub(2)].offset);
        }
    }
    found
}

#[derive(Debug, Clone)]
struct Token {
    text: String,
    offset: usize,
    ident: bool,
}

impl Token {
    fn is(&self, punct: &str) -> bool {
        !self.ident && self.text == punct
    }

    fn is_ident(&self, name: &str) -> bool {
        self.ident && self.text == name
    }
}

/// Identifiers, `::`, and every other character as a token of its own (`code` has no comments
/// or literals left).
fn tokenize(code: &str) -> Vec<Token> {
    let bytes = code.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_whitespace() {
            i += 1;
        } else if b == b'r'
            && bytes.get(i + 1) == Some(&b'#')
            && bytes.get(i + 2).is_some_and(|c| is_ident_start(*c))
        {
            let start = i + 2;
            i = start;
            while i < bytes.len() && is_ident_byte(bytes[i]) {
                i += 1;
            }
            tokens.push(Token {
                text: code[start..i].to_string(),
                offset: start,
                ident: true,
            });
        } else if is_ident_start(b) {
            let start = i;
            while i < bytes.len() && is_ident_byte(bytes[i]) {
                i += 1;
            }
            tokens.push(Token {
                text: code[start..i].to_string(),
                offset: start,
                ident: true,
            });
        } else if b.is_ascii_digit() {
            let start = i;
            while i < bytes.len() && is_ident_byte(bytes[i]) {
                i += 1;
            }
            tokens.push(Token {
                text: code[start..i].to_string(),
                offset: start,
                ident: false,
            });
        } else if b == b':' && bytes.get(i + 1) == Some(&b':') {
            tokens.push(Token {
                text: "::".to_string(),
                offset: i,
                ident: false,
            });
            i += 2;
        } else {
            let len = utf8_len(b);
            let end = (i + len).min(bytes.len());
            tokens.push(Token {
                text: code[i..end].to_string(),
                offset: i,
                ident: false,
            });
            i = end;
        }
    }
    tokens
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

fn utf8_len(lead: u8) -> usize {
    match lead {
        0xF0.. => 4,
        0xE0.. => 3,
        0xC0.. => 2,
        _ => 1,
    }
}

/// `text` with comments (doc comments too), string, byte-string and char literals blanked
/// out by spaces, newlines kept: same length, same lines, only code left.
fn code_only(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = bytes.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for b in &mut out[from..to.min(bytes.len())] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
    };
    let ident_before = |i: usize| i > 0 && is_ident_byte(bytes[i - 1]);
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(bytes.len(), |n| i + n);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            let mut j = i;
            while j < bytes.len() {
                if bytes[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if bytes[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if let Some(hashes) = raw_string_start(bytes, i).filter(|_| !ident_before(i)) {
            // r"..", r#".."#, br".." (and c/cr): no escapes; ends at `"` and as many `#`.
            let quote = i + bytes[i..]
                .iter()
                .position(|&b| b == b'"')
                .expect("raw string");
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            let end = bytes[quote + 1..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(bytes.len(), |n| quote + 1 + n + close.len());
            blank(&mut out, quote, end);
            i = end;
        } else if bytes[i] == b'"' {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j] != b'"' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i, j + 1);
            i = j + 1;
        } else if bytes[i] == b'\'' {
            // A char literal ('x', '\n', 'é'), or a lifetime or label ('a) left as it is.
            if bytes.get(i + 1) == Some(&b'\\') {
                let mut j = i + 3;
                while j < bytes.len() && bytes[j] != b'\'' {
                    j += 1;
                }
                blank(&mut out, i, j + 1);
                i = j + 1;
            } else if let Some(&next) = bytes.get(i + 1) {
                let end = i + 1 + utf8_len(next);
                if bytes.get(end) == Some(&b'\'') {
                    blank(&mut out, i, end + 1);
                    i = end + 1;
                } else {
                    i += 1;
                }
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("only ASCII bytes were written over whole characters")
}

/// If a raw string literal starts at `i` (`r"`, `r#"`, `br"`, `cr#"`, ..), how many `#` it has.
fn raw_string_start(bytes: &[u8], i: usize) -> Option<usize> {
    let mut j = i;
    if matches!(bytes.get(j), Some(b'b' | b'c')) {
        j += 1;
    }
    if bytes.get(j) != Some(&b'r') {
        return None;
    }
    j += 1;
    let hashes = bytes[j..].iter().take_while(|&&b| b == b'#').count();
    (bytes.get(j + hashes) == Some(&b'"')).then_some(hashes)
}

// ---------------------------------------------------------------------------------------------
// Line limit

/// A source file over the limit: its lines, and those counted (before a final test module).
#[derive(Debug, PartialEq, Eq)]
struct TooLong {
    file: String,
    lines: usize,
    counted: usize,
}

fn line_violations(sources: &[Source]) -> Vec<TooLong> {
    sources
        .iter()
        .filter(|s| !is_test_file(&s.path))
        .filter_map(|s| {
            let lines = s.text.lines().count();
            let counted = counted_lines(&s.text);
            (counted > MAX_LINES).then(|| TooLong {
                file: s.path.clone(),
                lines,
                counted,
            })
        })
        .collect()
}

/// Lines of `text` before the `#[cfg(test)]` of a test module that ends the file (all of
/// them when there is none).
fn counted_lines(text: &str) -> usize {
    let code = code_only(text);
    let tokens = tokenize(&code);
    let last_code = code.trim_end().len();
    let final_test = inline_modules(&tokens)
        .into_iter()
        .filter(|m| m.test && m.close + 1 >= last_code)
        .min_by_key(|m| m.open);
    match final_test.and_then(|m| m.cfg_test_at) {
        Some(at) => code[..at].bytes().filter(|&b| b == b'\n').count(),
        None => text.lines().count(),
    }
}

fn render_lines(found: &[TooLong]) -> String {
    let mut out = format!(
        "\nSource files over {MAX_LINES} lines (a final #[cfg(test)] module and tests.rs files \
         apart): split them by concept.\n\n"
    );
    for f in found {
        let apart = if f.counted == f.lines {
            String::new()
        } else {
            format!(" ({} with its tests)", f.lines)
        };
        let _ = writeln!(out, "{}: {} lines{apart}", f.file, f.counted);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The check's own tests

mod self_tests {
    use super::*;

    fn paths(text: &str) -> Vec<(String, usize)> {
        references(text)
            .into_iter()
            .map(|r| (r.segments.join("::"), r.line))
            .collect()
    }

    fn source(path: &str, text: &str) -> Source {
        Source {
            path: path.to_string(),
            text: text.to_string(),
        }
    }

    #[test]
    fn a_grouped_use_yields_each_leaf_on_its_line() {
        let text = "use crate::{\n    config::Config,\n    limit::{self, Window as W},\n};\n";
        assert_eq!(
            paths(text),
            [
                ("crate::config::Config".into(), 2),
                ("crate::limit".into(), 3),
                ("crate::limit::Window".into(), 3)
            ]
        );
        assert_eq!(references(text)[2].alias.as_deref(), Some("W"));
    }

    #[test]
    fn nested_braces_and_globs_keep_their_prefix() {
        let text = "pub(crate) use crate::proxy::{inflight::{Gate, Slot}, headers::*};";
        assert_eq!(
            paths(text),
            [
                ("crate::proxy::inflight::Gate".into(), 1),
                ("crate::proxy::inflight::Slot".into(), 1),
                ("crate::proxy::headers".into(), 1),
            ]
        );
    }

    #[test]
    fn pub_use_and_other_crates_are_read_as_uses() {
        let text = "pub use crate::body::ResponseBody;\nuse std::sync::Arc;\nuse ::bytes::Bytes;";
        let found = paths(text);
        assert_eq!(found[0], ("crate::body::ResponseBody".into(), 1));
        assert_eq!(found[1], ("std::sync::Arc".into(), 2));
        assert_eq!(found[2], ("bytes::Bytes".into(), 3));
    }

    #[test]
    fn inline_paths_count_and_turbofish_ends_them() {
        let text = "fn f() {\n    let w = crate::limit::bucket::since::<u8>(x);\n    \
                    super::super::a::b();\n}";
        assert_eq!(
            paths(text),
            [
                ("crate::limit::bucket::since".into(), 2),
                ("super::super::a::b".into(), 3)
            ]
        );
    }

    #[test]
    fn strings_comments_and_doc_links_do_not_count() {
        let text = r###"//! See [`crate::stack::Gateway`].
/// Links to [`crate::admin`].
// use crate::stack;
/* crate::stack::x /* nested crate::stack */ still crate::stack */
const A: &str = "use crate::stack::Gateway;";
const B: &str = r#"crate::stack" "#;
const C: &[u8] = br"crate::stack";
const D: char = '"';
fn f<'a>(x: &'a str) -> &'a str { let _ = '\''; x }
#[doc = "crate::stack"]
fn g() { crate::route::normalize_path("crate::stack") }
"###;
        assert_eq!(paths(text), [("crate::route::normalize_path".into(), 11)]);
    }

    #[test]
    fn precise_capture_visibility_and_macro_crate_are_not_imports() {
        let text = "pub(in crate::server) fn f() -> impl Future + use<T> { $crate::x::y() }";
        assert_eq!(paths(text), []);
        let text = "fn f() { for k in crate::limit::keys() {} }";
        assert_eq!(paths(text), [("crate::limit::keys".into(), 1)]);
    }

    #[test]
    fn test_modules_are_known_and_super_resolves_through_them() {
        let text =
            "fn a() {}\n#[cfg(test)]\nmod tests {\n    use super::super::bucket::tsc_now;\n}\n";
        let found = references(text);
        assert_eq!(found.len(), 1);
        assert!(found[0].in_test);
        assert_eq!(found[0].inline_modules, ["tests"]);
        let modules = BTreeSet::new();
        let here = [
            module_path("src/limit/headers.rs"),
            found[0].inline_modules.clone(),
        ]
        .concat();
        assert_eq!(
            resolve(&found[0].segments, &here, &modules)
                .unwrap()
                .join("::"),
            "limit::bucket::tsc_now"
        );
    }

    #[test]
    fn floors_place_the_longest_key() {
        let key = |p: &str| place_file(p).map(|(k, f)| (k.to_string(), f));
        assert_eq!(
            key("src/proxy/inflight.rs"),
            Some(("proxy::inflight".into(), 3))
        );
        assert_eq!(key("src/proxy/pool.rs"), Some(("proxy".into(), 6)));
        assert_eq!(
            key("src/config/validate/tests.rs"),
            Some(("config".into(), 1))
        );
        assert_eq!(key("src/lib.rs"), Some(("lib".into(), 8)));
        assert_eq!(key("src/pipeline.rs"), None);
    }

    #[test]
    fn the_check_reports_upward_and_sideways_edges_only() {
        let sources = [
            source("src/lib.rs", "pub mod config;\npub use stack::Gateway;\n"),
            source("src/config/mod.rs", "use crate::config::types::KeyId;\n"),
            source("src/config/types.rs", ""),
            source(
                "src/error.rs",
                "use crate::{config::Config, limit::Window};\n",
            ),
            source(
                "src/auth/mod.rs",
                "use crate::limit::Bucket;\nuse crate::error::GatewayError;\n",
            ),
            source("src/limit/mod.rs", "fn f() { crate::auth::x(); }\n"),
            source("src/proxy/inflight.rs", "use super::Upstream;\n"),
            source("src/proxy/mod.rs", "use inflight::Slot;\n"),
            source("src/server/mod.rs", "fn f(g: &crate::Gateway) {}\n"),
            source("src/stack.rs", "use crate::server::Handler;\n"),
            source("src/pipeline.rs", ""),
        ];
        let found = import_violations(&sources);
        assert_eq!(found.unplaced, ["src/pipeline.rs"]);
        let lines: Vec<String> = found
            .upward
            .iter()
            .map(|u| {
                format!(
                    "{}:{} {} {}->{} {}",
                    u.file, u.line, u.path, u.from_floor, u.to_floor, u.to
                )
            })
            .collect();
        assert_eq!(
            lines,
            [
                "src/error.rs:1 crate::limit::Window 4->6 limit",
                "src/limit/mod.rs:1 crate::auth::x 6->6 auth",
                "src/proxy/inflight.rs:1 crate::proxy::Upstream 3->6 proxy",
                "src/server/mod.rs:1 crate::stack::Gateway 6->7 stack",
            ]
        );
        let report = render_imports(&found);
        assert!(
            report.contains(
                "src/error.rs:1 imports limit (floor 6) from floor 4: crate::limit::Window"
            ),
            "{report}"
        );
        assert!(report.contains("(sideways, limit -> auth)"), "{report}");
    }

    #[test]
    fn a_final_test_module_is_not_counted() {
        let body = "fn a() {}\n".repeat(3);
        let with_tests =
            format!("{body}\n#[cfg(test)]\nmod tests {{\n    #[test]\n    fn t() {{}}\n}}\n");
        assert_eq!(counted_lines(&with_tests), 4);
        // A test module followed by more code is counted.
        let in_middle = format!("#[cfg(test)]\nmod tests {{}}\n{body}");
        assert_eq!(counted_lines(&in_middle), 5);
        assert_eq!(counted_lines(&body), 3);
        let sources = [
            source("src/big.rs", &"x\n".repeat(MAX_LINES + 1)),
            source(
                "src/ok.rs",
                &format!(
                    "{}#[cfg(test)]\nmod tests {{\n{}}}\n",
                    "x\n".repeat(MAX_LINES),
                    "x\n".repeat(50)
                ),
            ),
            source("src/a/tests.rs", &"x\n".repeat(MAX_LINES * 2)),
            source("src/a/tests/more.rs", &"x\n".repeat(MAX_LINES * 2)),
        ];
        assert_eq!(
            line_violations(&sources),
            [TooLong {
                file: "src/big.rs".into(),
                lines: MAX_LINES + 1,
                counted: MAX_LINES + 1
            }]
        );
    }
}
