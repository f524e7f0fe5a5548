//! Checked reading of big-endian protocol fields. Every read returns `None` on truncated
//! input instead of panicking, because these bytes come from the network.

/// A cursor over a byte slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N).and_then(|b| b.try_into().ok())
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub fn i16(&mut self) -> Option<i16> {
        self.array().map(i16::from_be_bytes)
    }

    pub fn i32(&mut self) -> Option<i32> {
        self.array().map(i32::from_be_bytes)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub fn i64(&mut self) -> Option<i64> {
        self.array().map(i64::from_be_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// A NUL-terminated string (without the NUL). `None` when unterminated or not UTF-8.
    pub fn cstr(&mut self) -> Option<&'a str> {
        let end = self.buf.iter().position(|&b| b == 0)?;
        let s = std::str::from_utf8(&self.buf[..end]).ok()?;
        self.buf = &self.buf[end + 1..];
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_reads_are_none() {
        let mut r = Reader::new(&[0, 1, 2]);
        assert_eq!(r.i16(), Some(1));
        assert_eq!(r.i32(), None);
        assert_eq!(r.u8(), Some(2));
        assert_eq!(r.u8(), None);
        let mut r = Reader::new(b"abc");
        assert_eq!(r.cstr(), None);
        let mut r = Reader::new(b"abc\0d");
        assert_eq!(r.cstr(), Some("abc"));
        assert_eq!(r.rest(), b"d");
    }
}
