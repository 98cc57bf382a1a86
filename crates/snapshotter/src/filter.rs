//! containerd's filter language, as `List` receives it.
//!
//! One filter string is a comma-separated list of selectors that must all match; several strings match if
//! any one does; no strings (or an empty one) match everything. A selector is a field path, optionally
//! followed by an operator and a value: `name==x`, `parent!=""`, `labels."containerd.io/snapshot.ref"`,
//! `kind~=/^(view|active)$/`. Path elements are letters, digits and `_`, joined by `.`, or double-quoted
//! strings with Go escapes. Values run to the next comma or space, or are quoted with `"`, `/` or `|`.
//! Without an operator the selector tests presence. `==` needs the field present and equal; `!=` only
//! unequal; `~=` is a regular expression search.
//!
//! Snapshot fields: `name`, `parent`, `kind` (`active`, `view`, `committed`) and `labels.<key>`.

use regex::Regex;

use crate::error::{Result, SnapshotError};
use crate::model::Info;

/// A parsed set of filter strings.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Alternatives (OR) of selector lists (AND). Empty = match all.
    any: Vec<Vec<Selector>>,
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

impl Filter {
    /// Parses `List`'s filter strings; a syntax error is [`crate::Code::InvalidArgument`].
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Filter> {
        let mut any = Vec::new();
        for f in filters {
            let f = f.as_ref();
            let selectors = parse(f).map_err(|e| SnapshotError::invalid(format!("filter {f:?}: {e}")))?;
            if selectors.is_empty() {
                // An empty string matches everything, which makes the whole OR true.
                return Ok(Filter { any: Vec::new() });
            }
            any.push(selectors);
        }
        Ok(Filter { any })
    }

    /// Whether `info` passes.
    pub fn matches(&self, info: &Info) -> bool {
        self.any.is_empty() || self.any.iter().any(|sels| sels.iter().all(|s| s.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let (value, present) = field(info, &self.path);
        match &self.op {
            Op::Present => present,
            Op::Equal(v) => present && value == v,
            Op::NotEqual(v) => value != v,
            Op::Matches(re) => re.is_match(value),
        }
    }
}

fn field<'a>(info: &'a Info, path: &[String]) -> (&'a str, bool) {
    match path.first().map(String::as_str) {
        Some("name") => (&info.name, true),
        Some("parent") => (&info.parent, true),
        Some("kind") => (info.kind.as_str(), true),
        Some("labels") if path.len() == 2 => match info.labels.get(&path[1]) {
            Some(v) => (v, true),
            None => ("", false),
        },
        _ => ("", false),
    }
}

struct Parser<'a> {
    chars: std::iter::Peekable<std::str::CharIndices<'a>>,
}

fn parse(input: &str) -> std::result::Result<Vec<Selector>, String> {
    let mut p = Parser {
        chars: input.char_indices().peekable(),
    };
    let mut out = Vec::new();
    p.skip_space();
    if p.peek().is_none() {
        return Ok(out);
    }
    loop {
        out.push(p.selector()?);
        p.skip_space();
        match p.next() {
            None => return Ok(out),
            Some(',') => p.skip_space(),
            Some(c) => return Err(format!("unexpected {c:?} after a selector")),
        }
    }
}

fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

impl Parser<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().map(|(_, c)| *c)
    }

    fn next(&mut self) -> Option<char> {
        self.chars.next().map(|(_, c)| c)
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.next();
        }
    }

    fn selector(&mut self) -> std::result::Result<Selector, String> {
        let mut path = vec![self.path_element()?];
        loop {
            self.skip_space();
            if self.peek() == Some('.') {
                self.next();
                self.skip_space();
                path.push(self.path_element()?);
            } else {
                break;
            }
        }
        let op = match self.peek() {
            Some(c @ ('=' | '!' | '~')) => {
                self.next();
                if self.next() != Some('=') {
                    return Err(format!("unknown operator starting with {c:?}; use ==, != or ~="));
                }
                self.skip_space();
                let value = self.value()?;
                match c {
                    '=' => Op::Equal(value),
                    '!' => Op::NotEqual(value),
                    _ => Op::Matches(Regex::new(&value).map_err(|e| format!("bad regular expression: {e}"))?),
                }
            }
            _ => Op::Present,
        };
        Ok(Selector { path, op })
    }

    fn path_element(&mut self) -> std::result::Result<String, String> {
        match self.peek() {
            Some('"') => {
                self.next();
                self.quoted('"')
            }
            Some(c) if is_field_char(c) => {
                let mut s = String::new();
                while let Some(c) = self.peek().filter(|c| is_field_char(*c)) {
                    s.push(c);
                    self.next();
                }
                Ok(s)
            }
            Some(c) => Err(format!("expected a field name, found {c:?}")),
            None => Err("expected a field name, found the end".into()),
        }
    }

    fn value(&mut self) -> std::result::Result<String, String> {
        match self.peek() {
            Some(q @ ('"' | '/' | '|')) => {
                self.next();
                self.quoted(q)
            }
            // As in containerd's scanner, a bare value cannot start with a separator or an operator
            // character (`name===x` is an error, not the value `=x`).
            Some(c @ ('.' | '=' | '!' | '~')) => Err(format!("a value cannot start with {c:?}; quote it")),
            _ => {
                let mut s = String::new();
                while let Some(c) = self.peek().filter(|c| *c != ',' && !c.is_whitespace()) {
                    s.push(c);
                    self.next();
                }
                if s.is_empty() {
                    return Err("expected a value after the operator".into());
                }
                Ok(s)
            }
        }
    }

    /// Reads up to the closing `quote` (already past the opening one), resolving Go-style escapes. Inside
    /// `/.../` and `|...|` (regular expressions) an unknown escape is kept as written.
    fn quoted(&mut self, quote: char) -> std::result::Result<String, String> {
        let mut s = String::new();
        loop {
            match self.next() {
                None => return Err("quoted string not terminated".into()),
                Some(c) if c == quote => return Ok(s),
                Some('\\') => {
                    let c = self.next().ok_or("quoted string not terminated")?;
                    match c {
                        'a' => s.push('\u{7}'),
                        'b' => s.push('\u{8}'),
                        'f' => s.push('\u{c}'),
                        'n' => s.push('\n'),
                        'r' => s.push('\r'),
                        't' => s.push('\t'),
                        'v' => s.push('\u{b}'),
                        '\\' => s.push('\\'),
                        c if c == quote => s.push(c),
                        'x' => s.push(self.code_point(2, 16)?),
                        'u' => s.push(self.code_point(4, 16)?),
                        'U' => s.push(self.code_point(8, 16)?),
                        '0'..='7' => {
                            let mut v = c.to_digit(8).unwrap_or(0);
                            for _ in 0..2 {
                                let d = self
                                    .next()
                                    .and_then(|d| d.to_digit(8))
                                    .ok_or("bad octal escape")?;
                                v = v * 8 + d;
                            }
                            s.push(char::from_u32(v).ok_or("bad octal escape")?);
                        }
                        c if quote != '"' => {
                            s.push('\\');
                            s.push(c);
                        }
                        c => return Err(format!("unknown escape \\{c}")),
                    }
                }
                Some(c) => s.push(c),
            }
        }
    }

    fn code_point(&mut self, digits: usize, radix: u32) -> std::result::Result<char, String> {
        let mut v = 0u32;
        for _ in 0..digits {
            let d = self
                .next()
                .and_then(|d| d.to_digit(radix))
                .ok_or("bad escape: expected hex digits")?;
            v = v * radix + d;
        }
        char::from_u32(v).ok_or_else(|| format!("escape {v:#x} is not a character"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Kind;

    fn names(filters: &[&str], infos: &[Info]) -> Vec<String> {
        let f = Filter::parse_all(filters).unwrap();
        infos
            .iter()
            .filter(|i| f.matches(i))
            .map(|i| i.name.clone())
            .collect()
    }

    fn corpus() -> Vec<Info> {
        vec![
            Info::sample("c1", "", Kind::Committed, &[]),
            Info::sample("c2", "c1", Kind::Committed, &[("l", "1")]),
            Info::sample(
                "a1",
                "c2",
                Kind::Active,
                &[("l", "2"), ("containerd.io/snapshot.ref", "sha256:x")],
            ),
            Info::sample("v1", "c2", Kind::View, &[("l", "")]),
            Info::sample("a2", "", Kind::Active, &[]),
        ]
    }

    #[test]
    fn the_cases_containerd_uses() {
        let c = corpus();
        assert_eq!(names(&[], &c).len(), 5);
        assert_eq!(names(&[""], &c).len(), 5);
        assert_eq!(names(&["kind==committed"], &c), ["c1", "c2"]);
        assert_eq!(names(&["kind==active"], &c), ["a1", "a2"]);
        assert_eq!(names(&["name==c1", "name==a2"], &c), ["c1", "a2"]);
        assert_eq!(names(&["name==a1,labels.l"], &c), ["a1"]);
        assert_eq!(names(&["name==a2,labels.l"], &c), Vec::<String>::new());
        assert_eq!(names(&["parent==c2"], &c), ["a1", "v1"]);
        assert_eq!(names(&["parent!=\"\""], &c), ["c2", "a1", "v1"]);
        assert_eq!(names(&["labels.l"], &c), ["c2", "a1", "v1"]);
        assert_eq!(names(&["labels.l==2"], &c), ["a1"]);
        assert_eq!(names(&["labels.\"l\"==1"], &c), ["c2"]);
        assert_eq!(
            names(
                &[r#"labels."containerd.io/snapshot.ref"==sha256:x,parent==c2"#],
                &c
            ),
            ["a1"]
        );
        assert_eq!(names(&["kind~=/^(view|active)$/"], &c), ["a1", "v1", "a2"]);
        assert_eq!(names(&["name~=|^c|"], &c), ["c1", "c2"]);
        assert_eq!(names(&[" name == c1 , kind == committed "], &c), ["c1"]);
        assert_eq!(names(&["labels.missing!=x"], &c).len(), 5);
        assert_eq!(names(&["unknown"], &c), Vec::<String>::new());
    }

    #[test]
    fn values_with_slashes_and_escapes() {
        let c = vec![Info::sample(
            "default/4/extract-1 sha256:ab",
            "ns/1/p",
            Kind::Active,
            &[("k", "a\"b")],
        )];
        assert_eq!(names(&["parent==ns/1/p"], &c).len(), 1);
        assert_eq!(names(&[r#"name=="default/4/extract-1 sha256:ab""#], &c).len(), 1);
        assert_eq!(names(&[r#"labels.k=="a\"b""#], &c).len(), 1);
        assert_eq!(names(&[r#"labels.k=="a\x22b""#], &c).len(), 1);
        assert_eq!(names(&[r#"name~=/sha256:a\w/"#], &c).len(), 1);
    }

    #[test]
    fn syntax_errors_are_invalid_arguments() {
        for bad in [
            "name=x",
            "name==",
            "name===",
            "name==.x",
            "name!=!x",
            "name<>x",
            ",name==x",
            "name==x,",
            "labels.\"unterminated",
            "name==\"unterminated",
            "labels..x",
            "name==x y",
            "name~=/(/",
            "name==\"\\q\"",
            ".name",
        ] {
            let e = Filter::parse_all(&[bad]).unwrap_err();
            assert_eq!(e.code, crate::Code::InvalidArgument, "{bad:?} gave {e}");
        }
    }
}
