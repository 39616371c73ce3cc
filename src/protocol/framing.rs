//! Message-boundary tracking for the relay. After login every message in either direction is
//! a type byte and a 4-byte length; the tracker reads only those five bytes and skips bodies,
//! so the relay can stop (or inject a message) exactly between two messages without copying
//! or allocating per message. It can also count messages of chosen types (the relay counts
//! requests one way and ReadyForQuery the other, to know whether the server is idle), leaving
//! out the Syncs a server ignores in copy-in mode ([`Framer::copy_in_aware`]).

/// A set of message type bytes, as a bitmask (type bytes are ASCII letters; a byte of 128 or
/// more is never a member).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TypeSet(u128);

impl TypeSet {
    /// The set of `types`.
    pub const fn of(types: &[u8]) -> TypeSet {
        let mut bits = 0u128;
        let mut i = 0;
        while i < types.len() {
            if types[i] < 128 {
                bits |= 1 << types[i];
            }
            i += 1;
        }
        TypeSet(bits)
    }

    /// True when `t` is in the set.
    pub const fn contains(self, t: u8) -> bool {
        t < 128 && self.0 & (1 << t) != 0
    }
}

/// Tracks where the current message ends in a byte stream.
#[derive(Debug, Default, Clone)]
pub struct Framer {
    header: [u8; 5],
    have: usize,
    remaining: usize,
    last_type: u8,
    /// Types whose messages are counted in `count`.
    counted: TypeSet,
    /// Messages of a `counted` type started so far.
    count: u64,
    /// Types that make `pending` true until the next message of a `counted` type.
    opening: TypeSet,
    /// A message of an `opening` type came after the last counted one.
    pending: bool,
    /// The body of a counted message starts with the next byte.
    at_counted_body: bool,
    /// First body byte of the last counted message that had one (for ReadyForQuery: the
    /// transaction status, `I`, `T` or `E`).
    counted_first: u8,
    /// Type whose bodies' first byte [`Framer::take_watched_body`] reports (0: none).
    watch: u8,
    /// The body of a watched message (at least 4 bytes long) starts with the next byte.
    at_watched_body: bool,
    /// Where such a body began in the slice of the last [`Framer::advance`] call.
    watched_body: Option<usize>,
    /// Client → server: the Syncs the server ignores in copy-in mode ([`Framer::copy_in_aware`]).
    copy_in: Option<CopyIn>,
}

/// The Syncs since the client's last Query or Execute, which the server ignores if that
/// message started a COPY FROM STDIN: a client only sends CopyData, CopyDone or CopyFail once
/// the server is in copy-in mode, so the first of those uncounts them.
#[derive(Debug, Default, Clone, Copy)]
struct CopyIn {
    /// Syncs counted since the last Query or Execute.
    syncs: u64,
    /// `pending` just after that Query or Execute.
    pending_then: bool,
    /// A copy message came since then (its Syncs are uncounted already).
    copying: bool,
}

impl Framer {
    /// A framer that also counts the messages of the `counted` types, and notes whether a
    /// message of an `opening` type came after the last of them.
    pub fn counting(counted: TypeSet, opening: TypeSet) -> Framer {
        Framer {
            counted,
            opening,
            ..Framer::default()
        }
    }

    /// Also reports where the bodies of `watch` messages that are at least 4 bytes long begin
    /// ([`Framer::take_watched_body`]).
    pub fn watching(mut self, watch: u8) -> Framer {
        self.watch = watch;
        self
    }

    /// For the client → server stream of the extended protocol: a Sync the server receives
    /// in copy-in mode is ignored (PostgreSQL drops Flush and Sync there, for clients such as
    /// libpq and pg8000 that send one after the Execute of a COPY FROM STDIN), so it gets no
    /// ReadyForQuery and is not counted, and what was pending stays pending until the Sync
    /// after CopyDone. Without this a session whose client ran such a COPY would never again
    /// look idle.
    pub fn copy_in_aware(mut self) -> Framer {
        self.copy_in = Some(CopyIn::default());
        self
    }

    /// Copy-in tracking for a message of type `t` whose header was just read (after the
    /// counting).
    fn copy_in_header(&mut self, t: u8) {
        let Some(c) = self.copy_in.as_mut() else {
            return;
        };
        match t {
            b'Q' | b'E' => {
                *c = CopyIn {
                    syncs: 0,
                    pending_then: self.pending,
                    copying: false,
                }
            }
            b'S' => c.syncs += 1,
            b'd' | b'c' | b'f' if !c.copying => {
                if c.syncs > 0 {
                    self.count -= c.syncs;
                    self.pending = c.pending_then;
                }
                c.syncs = 0;
                c.copying = true;
            }
            _ => {}
        }
    }

    /// Offset, in the slice given to the last [`Framer::advance`] call, where the body of a
    /// watched message began (at most one per call: a call ends at the first boundary).
    pub fn take_watched_body(&mut self) -> Option<usize> {
        self.watched_body.take()
    }

    /// Messages of the counted types started so far (a message counts from its header on).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// True when a message of an opening type came after the last counted one.
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// First body byte of the most recent counted message that had a body (0 before any):
    /// after ReadyForQuery, the server's transaction status.
    pub fn last_counted_byte(&self) -> u8 {
        self.counted_first
    }

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
                if self.at_counted_body {
                    self.at_counted_body = false;
                    self.counted_first = data[pos];
                }
                if self.at_watched_body {
                    self.at_watched_body = false;
                    self.watched_body = Some(pos);
                }
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
                if self.counted.contains(self.last_type) {
                    self.count += 1;
                    self.pending = false;
                } else if self.opening.contains(self.last_type) {
                    self.pending = true;
                }
                self.copy_in_header(self.last_type);
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                // A length below 4 is a protocol violation the peer will report; treat the
                // message as header-only so tracking never underflows.
                self.remaining = len.saturating_sub(4);
                self.at_counted_body = self.remaining > 0 && self.counted.contains(self.last_type);
                self.at_watched_body =
                    self.watch != 0 && self.last_type == self.watch && self.remaining >= 4;
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
    fn reports_where_watched_bodies_begin_in_each_slice() {
        let mut f = Framer::default().watching(b'A');
        // An 'A' with an 8-byte body after a 'Z', in one slice: the body begins at 11.
        let two = b"Z\0\0\0\x05IA\0\0\0\x0c\0\0\0\x07x\0\0\0";
        assert_eq!(f.advance(two), 6);
        assert_eq!(f.take_watched_body(), None);
        assert_eq!(f.advance(&two[6..]), 13);
        assert_eq!(f.take_watched_body(), Some(5));
        assert_eq!(f.take_watched_body(), None);
        // Header in one slice, body in the next: offset 0 of the next.
        let mut f = Framer::default().watching(b'A');
        assert_eq!(f.advance(&two[6..11]), 5);
        assert_eq!(f.take_watched_body(), None);
        assert_eq!(f.advance(&two[11..]), 8);
        assert_eq!(f.take_watched_body(), Some(0));
        // A body shorter than 4 bytes is not reported.
        let mut f = Framer::default().watching(b'A');
        f.feed(b"A\0\0\0\x06xy");
        assert_eq!(f.take_watched_body(), None);
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
    fn counts_chosen_types_and_notes_openings() {
        let mut f = Framer::counting(TypeSet::of(b"QS"), TypeSet::of(b"PBE"));
        f.feed(b"Q\0\0\0\x05\0P\0\0\0\x04");
        assert_eq!((f.count(), f.pending()), (1, true));
        // A counted message is counted from its header on, and closes what was pending.
        f.feed(b"S\0\0");
        assert_eq!((f.count(), f.pending()), (1, true));
        f.feed(b"\0\x04");
        assert_eq!((f.count(), f.pending()), (2, false));
        f.feed(b"d\0\0\0\x04");
        assert_eq!((f.count(), f.pending()), (2, false));
        assert!(
            !TypeSet::of(b"Q").contains(0xd1),
            "no byte above 127 is a member"
        );
    }

    #[test]
    fn keeps_the_first_body_byte_of_the_last_counted_message() {
        let mut f = Framer::counting(TypeSet::of(b"Z"), TypeSet::default());
        assert_eq!(f.last_counted_byte(), 0);
        // Split between header and body, and messages of other types between.
        f.feed(b"C\0\0\0\x05XZ\0\0\0\x05");
        f.feed(b"TD\0\0\0\x05Y");
        assert_eq!(f.last_counted_byte(), b'T');
        f.feed(b"Z\0\0\0\x05I");
        assert_eq!(f.last_counted_byte(), b'I');
    }

    /// Messages of `types`, each with an empty body.
    fn msgs(types: &[u8]) -> Vec<u8> {
        types.iter().flat_map(|&t| [t, 0, 0, 0, 4]).collect()
    }

    fn requests() -> Framer {
        Framer::counting(TypeSet::of(b"QSF"), TypeSet::of(b"PBDECH")).copy_in_aware()
    }

    #[test]
    fn a_sync_in_copy_in_mode_is_not_counted() {
        // pg8000 and libpq's extended-protocol COPY FROM STDIN: the Sync after Execute reaches
        // the server in copy-in mode and is ignored; the one after CopyDone is answered.
        let mut f = requests();
        f.feed(&msgs(b"PSDSBHEHS"));
        assert_eq!((f.count(), f.pending()), (3, false));
        f.feed(&msgs(b"d"));
        assert_eq!((f.count(), f.pending()), (2, true), "copying: busy");
        f.feed(&msgs(b"dddc"));
        assert_eq!((f.count(), f.pending()), (2, true), "awaiting the Sync");
        f.feed(&msgs(b"S"));
        assert_eq!((f.count(), f.pending()), (3, false), "three ReadyForQuery");
        // A CopyFail ends it the same way; copy messages after that change nothing more.
        f.feed(&msgs(b"PBESdfSd"));
        assert_eq!((f.count(), f.pending()), (4, false));
        // COPY from a simple Query: nothing to uncount.
        f.feed(&msgs(b"Qddc"));
        assert_eq!((f.count(), f.pending()), (5, false));
        // Without copy-in tracking every Sync counts.
        let mut plain = Framer::counting(TypeSet::of(b"QSF"), TypeSet::of(b"PBDECH"));
        plain.feed(&msgs(b"PSDSBHEHSddcS"));
        assert_eq!(plain.count(), 4);
    }

    #[test]
    fn bogus_length_does_not_underflow() {
        let mut f = Framer::default();
        f.feed(b"Q\0\0\0\x01");
        assert!(f.at_boundary());
    }
}
