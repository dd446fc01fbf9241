//! Event names, their batching prefix, and glob patterns over segments.
//!
//! Names are colon-separated (`data:users:created`). The batching key of a
//! name, its *prefix*, is its first `depth` segments (two by default), so
//! `data:users:created` batches under `data:users`; a name with fewer segments
//! is its own prefix.
//!
//! Patterns are globs over whole segments: `*` matches exactly one segment, and
//! a trailing `*` matches one or more remaining segments.
//!
//! A double colon is not a separator: it belongs to the segment, so Rust
//! module paths stay whole. The log key `log:myapp::indexer` has two segments,
//! `log` and `myapp::indexer`, and batches per module. In a pattern, a segment
//! ending in `::*` matches that module and every module below it:
//! `log:myapp::*` matches `log:myapp`, `log:myapp::indexer` and
//! `log:myapp::indexer::walk`, but not `log:myapp2`.
//!
//! ```
//! use spillway::{prefix_of, Pattern};
//! assert_eq!(prefix_of("data:users:created", 2), "data:users");
//! assert_eq!(prefix_of("serving.snapshot", 2), "serving.snapshot");
//! let p = Pattern::parse("sentinel:*:status").unwrap();
//! assert!(p.matches("sentinel:42:status"));
//! assert!(Pattern::parse("data:*").unwrap().matches("data:a:b:c"));
//! assert_eq!(prefix_of("log:myapp::indexer", 2), "log:myapp::indexer");
//! assert!(Pattern::parse("log:myapp::*").unwrap().matches("log:myapp::indexer"));
//! ```

use crate::error::{Error, Result};

/// The default number of segments in a batching prefix.
pub const DEFAULT_PREFIX_DEPTH: usize = 2;

/// The batching key of `name`: its first `depth` colon-separated segments.
///
/// Never allocates. A `depth` of 0 is treated as 1.
pub fn prefix_of(name: &str, depth: usize) -> &str {
    let depth = depth.max(1);
    let mut seen = 0;
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b':' {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && b[i] == b':' {
            i += 1;
        }
        if i - start == 1 {
            seen += 1;
            if seen == depth {
                return &name[..start];
            }
        }
    }
    name
}

/// The segments of `s`: split at single colons; `::` stays inside a segment.
/// (Three or more colons in a row are refused by validation, see `has_colon_run`.)
/// Whether `s` has three or more colons in a row: an empty segment next to a `::`.
fn has_colon_run(s: &str) -> bool {
    s.contains(":::")
}

fn segments(s: &str) -> impl Iterator<Item = &str> {
    let b = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        while i < b.len() {
            if b[i] != b':' {
                i += 1;
                continue;
            }
            let run = i;
            while i < b.len() && b[i] == b':' {
                i += 1;
            }
            if i - run != 2 {
                let seg = &s[start..run];
                start = i;
                return Some(seg);
            }
        }
        done = true;
        Some(&s[start..])
    })
}

/// Checks that `name` can be published: non-empty, no empty segment, no `*`.
pub fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("the name is empty")
    } else if has_colon_run(name) || segments(name).any(str::is_empty) {
        Some("it has an empty segment")
    } else if name.contains('*') {
        Some("`*` is only allowed in patterns")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Lit(Box<str>),
    Any,
    /// `a::b::*`: the module `a::b` and every module below it (holds `a::b`).
    Module(Box<str>),
}

/// A glob over colon-separated segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: Box<str>,
    segs: Box<[Seg]>,
    /// The last `*` also matches every segment after it.
    open_tail: bool,
}

impl Pattern {
    /// Parses a pattern; the error quotes it and says what is wrong.
    pub fn parse(text: &str) -> Result<Pattern> {
        let bad = |reason| Error::InvalidPattern {
            pattern: text.to_owned(),
            reason,
        };
        if text.is_empty() {
            return Err(bad("the pattern is empty"));
        }
        if has_colon_run(text) {
            return Err(bad("it has an empty segment"));
        }
        let mut segs = Vec::new();
        for seg in segments(text) {
            segs.push(match seg {
                "" => return Err(bad("it has an empty segment")),
                "*" => Seg::Any,
                s if s.len() > 3 && s.ends_with("::*") && !s[..s.len() - 1].contains('*') => {
                    Seg::Module(s[..s.len() - 3].into())
                }
                s if s.contains('*') => return Err(bad(
                    "`*` must be a whole segment or end a module path (`a::*`); no `**` or `a*`",
                )),
                s => Seg::Lit(s.into()),
            });
        }
        let open_tail = segs.len() > 1 && segs.last() == Some(&Seg::Any);
        Ok(Pattern {
            text: text.into(),
            segs: segs.into(),
            open_tail,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `name` matches. Allocation-free.
    pub fn matches(&self, name: &str) -> bool {
        let mut parts = segments(name);
        let last = self.segs.len() - 1;
        for (i, seg) in self.segs.iter().enumerate() {
            let Some(part) = parts.next() else {
                return false;
            };
            match seg {
                Seg::Lit(lit) if **lit != *part => return false,
                Seg::Module(m)
                    if !(part == &**m
                        || (part.starts_with(&**m) && part[m.len()..].starts_with("::"))) =>
                {
                    return false
                }
                _ => {}
            }
            if i == last && self.open_tail {
                return true;
            }
        }
        parts.next().is_none()
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Pattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Pattern> {
        Pattern::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Catches an off-by-one in the segment counting that would batch
    // `data:users:created` and `data:users:deleted` apart (or all of `data` together).
    #[test]
    fn prefix_table() {
        let cases = [
            ("data:users:created", 2, "data:users"),
            ("data:users", 2, "data:users"),
            ("data:code_index:created", 2, "data:code_index"),
            ("serving.snapshot", 2, "serving.snapshot"),
            ("sentinel:7:status", 1, "sentinel"),
            ("a:b:c:d", 3, "a:b:c"),
            ("a:b", 0, "a"),
            ("log:myapp::indexer", 2, "log:myapp::indexer"),
            ("log:myapp::indexer", 1, "log"),
            ("log:a::b:c", 2, "log:a::b"),
        ];
        for (name, depth, want) in cases {
            assert_eq!(prefix_of(name, depth), want, "prefix_of({name:?}, {depth})");
        }
    }

    // Catches a glob that lets `*` span segments, or a trailing `*` that fails to.
    #[test]
    fn pattern_table() {
        let cases = [
            ("data:*", "data:a:b:c", true),
            ("data:*", "data:users", true),
            ("data:*", "data", false),
            ("data:*", "database:users", false),
            ("sentinel:*:status", "sentinel:42:status", true),
            ("sentinel:*:status", "sentinel:42:log", false),
            ("sentinel:*:status", "sentinel:42:status:x", false),
            ("chat:message", "chat:message", true),
            ("chat:message", "chat:message:x", false),
            ("*", "anything", true),
            ("*", "a:b", false),
            ("*:batch", "data:batch", true),
            ("gpu:*", "gpu:batch", true),
            ("log:*", "log:myapp::indexer", true),
            ("log:myapp::*", "log:myapp::indexer", true),
            ("log:myapp::*", "log:myapp::indexer::walk", true),
            ("log:myapp::*", "log:myapp", true),
            ("log:myapp::*", "log:myapp2::x", false),
            ("log:myapp::*", "log:myapp:x", false),
            ("log:myapp::indexer", "log:myapp::indexer", true),
            ("log:myapp::indexer", "log:myapp::indexer::walk", false),
            ("log:myapp", "log:myapp::indexer", false),
        ];
        for (pat, name, want) in cases {
            let p = Pattern::parse(pat).unwrap();
            assert_eq!(p.matches(name), want, "{pat:?} vs {name:?}");
        }
    }

    // Catches invalid patterns being accepted, and errors that do not quote the input.
    #[test]
    fn invalid_patterns_are_rejected_with_the_pattern_quoted() {
        for bad in [
            "", "data:::x", ":a", "a:", "**", "data:**", "da*ta", "a:b*", "a::*::b", "a:*::*",
        ] {
            let err = Pattern::parse(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    // Catches names that would create empty or wildcard batch keys.
    #[test]
    fn invalid_names_are_rejected_with_the_name_quoted() {
        for bad in ["", "data:::users", ":x", "x:", "data:*", "a::b:"] {
            let err = validate_name(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        validate_name("data:users:created").unwrap();
        validate_name("serving.snapshot").unwrap();
        validate_name("log:myapp::indexer").unwrap();
    }
}
