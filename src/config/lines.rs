//! Finds the line of each key path in the YAML text, so errors found after parsing
//! (an unknown upstream, a bad CIDR) can still say where they are.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Key path (`routes[2].plugins[0]`) → 1-based line.
#[derive(Debug, Default)]
pub struct LineIndex {
    lines: HashMap<String, usize>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
}

impl Builder {
    /// The path of the node that starts now, and advances the parent's position.
    fn next_path(&mut self) -> Option<String> {
        match self.stack.last_mut()? {
            Frame::Map { path, key } => {
                let key = key.take()?;
                Some(join(path, &key))
            }
            Frame::Seq { path, index } => {
                let p = format!("{path}[{index}]");
                *index += 1;
                Some(p)
            }
        }
    }

    /// In a mapping, a scalar is a key when no key is pending.
    fn is_key_position(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { key: None, .. }))
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(value, ..) => {
                if self.is_key_position() {
                    if let Some(Frame::Map { path, key }) = self.stack.last_mut() {
                        self.lines.entry(join(path, &value)).or_insert(line);
                        *key = Some(value);
                    }
                } else if let Some(p) = self.next_path() {
                    self.lines.entry(p).or_insert(line);
                }
            }
            Event::MappingStart(..) => {
                let path = self.next_path().unwrap_or_default();
                self.lines.entry(path.clone()).or_insert(line);
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.next_path().unwrap_or_default();
                self.lines.entry(path.clone()).or_insert(line);
                self.stack.push(Frame::Seq { path, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Alias(_) => {
                let _ = self.next_path();
            }
            _ => {}
        }
    }
}

impl LineIndex {
    /// Indexes `text`; a text that does not parse gives an empty index (the YAML parser's
    /// own error already carries its line).
    pub fn new(text: &str) -> Self {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut builder, false).is_err() {
            return LineIndex::default();
        }
        LineIndex {
            lines: builder.lines,
        }
    }

    /// The line of `path`, or of its nearest indexed ancestor.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(line) = self.lines.get(p) {
                return Some(*line);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "\
listeners:
  - address: 127.0.0.1:8080
routes:
  - name: a
    plugins: [x, y]
  - name: b
    match:
      path_prefix: /b
";

    #[test]
    fn finds_nested_keys_and_items() {
        let idx = LineIndex::new(YAML);
        assert_eq!(idx.line_of("listeners[0].address"), Some(2));
        assert_eq!(idx.line_of("routes[0].plugins[1]"), Some(5));
        assert_eq!(idx.line_of("routes[1].match.path_prefix"), Some(8));
        assert_eq!(idx.line_of("routes[1]"), Some(6));
    }

    #[test]
    fn falls_back_to_the_nearest_ancestor() {
        let idx = LineIndex::new(YAML);
        assert_eq!(idx.line_of("routes[1].match.nope"), Some(7));
        assert_eq!(idx.line_of("nothing"), None);
    }
}
