//! A minimal JSON reader for the router's admin API (`/api/routes`), so xtask needs no JSON
//! dependency: values, objects as ordered key lists, and the escapes the agent emits.
use anyhow::{Context as _, bail};

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

impl Value {
    /// The member `key` of an object; `None` for other values or a missing key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// The elements of an array; empty for anything else.
    pub fn items(&self) -> &[Value] {
        match self {
            Value::Array(items) => items,
            _ => &[],
        }
    }
}

pub fn parse(text: &str) -> anyhow::Result<Value> {
    let mut parser = Parser {
        bytes: text.as_bytes(),
        pos: 0,
    };
    let value = parser.value()?;
    parser.skip_ws();
    if parser.pos != parser.bytes.len() {
        bail!(
            "trailing characters after JSON value at byte {}",
            parser.pos
        );
    }
    Ok(value)
}

struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self
            .bytes
            .get(self.pos)
            .is_some_and(u8::is_ascii_whitespace)
        {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> anyhow::Result<u8> {
        self.skip_ws();
        self.bytes
            .get(self.pos)
            .copied()
            .context("JSON ends too early")
    }

    fn expect(&mut self, byte: u8) -> anyhow::Result<()> {
        if self.peek()? != byte {
            bail!(
                "expected `{}` at byte {} of JSON",
                char::from(byte),
                self.pos
            );
        }
        self.pos += 1;
        Ok(())
    }

    fn literal(&mut self, word: &str, value: Value) -> anyhow::Result<Value> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(value)
        } else {
            bail!("unexpected token at byte {} of JSON", self.pos)
        }
    }

    fn value(&mut self) -> anyhow::Result<Value> {
        match self.peek()? {
            b'{' => self.object(),
            b'[' => self.array(),
            b'"' => self.string().map(Value::String),
            b't' => self.literal("true", Value::Bool(true)),
            b'f' => self.literal("false", Value::Bool(false)),
            b'n' => self.literal("null", Value::Null),
            _ => self.number(),
        }
    }

    fn object(&mut self) -> anyhow::Result<Value> {
        self.expect(b'{')?;
        let mut members = Vec::new();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_ws();
            let key = self.string()?;
            self.expect(b':')?;
            members.push((key, self.value()?));
            match self.peek()? {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    return Ok(Value::Object(members));
                }
                _ => bail!("expected `,` or `}}` at byte {} of JSON", self.pos),
            }
        }
    }

    fn array(&mut self) -> anyhow::Result<Value> {
        self.expect(b'[')?;
        let mut items = Vec::new();
        if self.peek()? == b']' {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value()?);
            match self.peek()? {
                b',' => self.pos += 1,
                b']' => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => bail!("expected `,` or `]` at byte {} of JSON", self.pos),
            }
        }
    }

    fn string(&mut self) -> anyhow::Result<String> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            let byte = *self
                .bytes
                .get(self.pos)
                .context("unterminated JSON string")?;
            self.pos += 1;
            match byte {
                b'"' => return String::from_utf8(out).context("JSON string is not UTF-8"),
                b'\\' => {
                    let escape = *self.bytes.get(self.pos).context("unterminated escape")?;
                    self.pos += 1;
                    let decoded = match escape {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'u' => {
                            let hex = self
                                .bytes
                                .get(self.pos..self.pos + 4)
                                .and_then(|h| std::str::from_utf8(h).ok())
                                .context("short \\u escape in JSON")?;
                            self.pos += 4;
                            let code = u32::from_str_radix(hex, 16).context("bad \\u escape")?;
                            char::from_u32(code).unwrap_or('\u{fffd}')
                        }
                        other => char::from(other),
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(decoded.encode_utf8(&mut buf).as_bytes());
                }
                _ => out.push(byte),
            }
        }
    }

    fn number(&mut self) -> anyhow::Result<Value> {
        let start = self.pos;
        while self
            .bytes
            .get(self.pos)
            .is_some_and(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
        {
            self.pos += 1;
        }
        let text = std::str::from_utf8(&self.bytes[start..self.pos]).unwrap_or_default();
        text.parse()
            .map(Value::Number)
            .with_context(|| format!("bad JSON number `{text}` at byte {start}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_admin_answer() {
        let text = r#"{"routes":[{"domain":"bench-1.local","path":"/","backends":[
            {"container_id":"ab\u0063","state":"up","requests":12},{"state":"starting"}]}],
            "datapath":{"mode":"splice","kernel_offload":true,"bytes_spliced":1.5e3,"x":null}}"#;
        let value = parse(text).unwrap();
        let route = &value.get("routes").unwrap().items()[0];
        assert_eq!(route.get("domain").unwrap().as_str(), Some("bench-1.local"));
        let backends = route.get("backends").unwrap().items();
        assert_eq!(
            backends[0].get("container_id").unwrap().as_str(),
            Some("abc")
        );
        assert_eq!(backends[1].get("state").unwrap().as_str(), Some("starting"));
        let datapath = value.get("datapath").unwrap();
        assert_eq!(
            datapath.get("bytes_spliced").unwrap().as_f64(),
            Some(1500.0)
        );
        assert_eq!(datapath.get("kernel_offload"), Some(&Value::Bool(true)));
        assert!(parse("{\"a\":1} x").is_err());
        assert!(parse("[1,").is_err());
    }
}
