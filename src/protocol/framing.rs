//! Message-boundary tracking for the relay. After login every message in either direction is
//! a type byte and a 4-byte length; the tracker reads only those five bytes and skips bodies,
//! so the relay can stop (or inject a message) exactly between two messages without copying
//! or allocating per message.

/// Tracks where the current message ends in a byte stream.
#[derive(Debug, Default, Clone)]
pub struct Framer {
    header: [u8; 5],
    have: usize,
    remaining: usize,
    last_type: u8,
}

impl Framer {
    /// True when the bytes fed so far end exactly at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }

    /// Type byte of the most recently started message.
    pub fn last_type(&self) -> u8 {
        self.last_type
    }

    /// Feeds `data` and returns how many of its bytes complete the current message: the whole
    /// slice when no boundary falls inside it, otherwise the offset just past the first
    /// boundary reached. Call in a loop to walk message by message.
    pub fn advance(&mut self, data: &[u8]) -> usize {
        let mut pos = 0;
        while pos < data.len() {
            if self.remaining > 0 {
                let take = self.remaining.min(data.len() - pos);
                self.remaining -= take;
                pos += take;
                if self.remaining == 0 {
                    return pos;
                }
                continue;
            }
            self.header[self.have] = data[pos];
            self.have += 1;
            pos += 1;
            if self.have == 5 {
                self.have = 0;
                self.last_type = self.header[0];
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                // A length below 4 is a protocol violation the peer will report; treat the
                // message as header-only so tracking never underflows.
                self.remaining = len.saturating_sub(4);
                if self.remaining == 0 {
                    return pos;
                }
            }
        }
        pos
    }

    /// Feeds all of `data`.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = self.advance(data);
            data = &data[n..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_boundaries_across_chunks() {
        let mut f = Framer::default();
        let msg = b"Q\0\0\0\x09abcd\0X\0\0\0\x04";
        for chunk in msg.chunks(3) {
            f.feed(chunk);
        }
        assert!(f.at_boundary());
        assert_eq!(f.last_type(), b'X');
        f.feed(&msg[..7]);
        assert!(!f.at_boundary());
    }

    #[test]
    fn advance_stops_at_first_boundary() {
        let mut f = Framer::default();
        let two = b"Z\0\0\0\x05IZ\0\0\0\x05T";
        assert_eq!(f.advance(two), 6);
        assert!(f.at_boundary());
        assert_eq!(f.advance(&two[6..]), 6);
    }

    #[test]
    fn bogus_length_does_not_underflow() {
        let mut f = Framer::default();
        f.feed(b"Q\0\0\0\x01");
        assert!(f.at_boundary());
    }
}
