//! Per-operation context of the io_uring event loop (seed 3.1): what a
//! completion needs is recovered from its `user_data` alone, with no
//! lookup table and no allocation per operation.
//!
//! `user_data` = kind (8 bits) | generation (24 bits) | connection slot (32
//! bits). The slot indexes the loop's connection table; the generation
//! changes every time a slot is reused, so a completion for a connection
//! that has since closed (its fd number perhaps reused) is recognised and
//! dropped instead of reaching the new connection. Loop-level operations
//! (the wake-up read, the acceptor, its retry timer, the linger timer,
//! the watch of half-closed sockets) use slot 0 and generation 0 and are told apart by kind.

pub(crate) mod accept;
pub(crate) mod cancel;
pub(crate) mod file;
pub(crate) mod recv;
pub(crate) mod send;
pub(crate) mod timer;

/// What an operation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum OpKind {
    /// The loop's eventfd read: other threads handed it work.
    Wake = 1,
    /// The acceptor's accept (multishot or single).
    Accept = 2,
    /// The acceptor's pause timer after EMFILE/ENFILE.
    AcceptRetry = 3,
    /// A connection's receive (multishot or single).
    Recv = 4,
    /// A connection's send.
    Send = 5,
    /// A connection's cancellation of its other operations.
    Cancel = 6,
    /// The loop's timer for lingering closes whose time is up.
    LingerTimer = 7,
    /// The loop's poll on its set of half-closed sockets (`EofWatch`).
    EofWatch = 8,
    /// A block request on the loop's ring (`op::file`); the slot is the
    /// file operation's, not a connection's.
    File = 9,
    /// A connection's receive into the application's buffer
    /// (`Connection::recv_into`).
    RecvInto = 10,
}

impl OpKind {
    fn from_u8(value: u8) -> Option<OpKind> {
        Some(match value {
            1 => OpKind::Wake,
            2 => OpKind::Accept,
            3 => OpKind::AcceptRetry,
            4 => OpKind::Recv,
            5 => OpKind::Send,
            6 => OpKind::Cancel,
            7 => OpKind::LingerTimer,
            8 => OpKind::EofWatch,
            9 => OpKind::File,
            10 => OpKind::RecvInto,
            _ => return None,
        })
    }
}

/// Generations wrap at 24 bits.
pub(crate) const GENERATION_MASK: u32 = (1 << 24) - 1;

/// The decoded `user_data` of a completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OpTag {
    pub kind: OpKind,
    pub generation: u32,
    pub slot: u32,
}

impl OpTag {
    pub(crate) fn loop_op(kind: OpKind) -> OpTag {
        OpTag { kind, generation: 0, slot: 0 }
    }

    pub(crate) fn conn_op(kind: OpKind, slot: u32, generation: u32) -> OpTag {
        OpTag { kind, generation: generation & GENERATION_MASK, slot }
    }

    pub(crate) fn encode(self) -> u64 {
        (self.kind as u64) << 56 | ((self.generation & GENERATION_MASK) as u64) << 32 | self.slot as u64
    }

    /// None for a `user_data` the loop never issued.
    pub(crate) fn decode(data: u64) -> Option<OpTag> {
        let kind = OpKind::from_u8((data >> 56) as u8)?;
        Some(OpTag { kind, generation: ((data >> 32) as u32) & GENERATION_MASK, slot: data as u32 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_generations_wrap() {
        for kind in [
            OpKind::Wake,
            OpKind::Accept,
            OpKind::AcceptRetry,
            OpKind::Recv,
            OpKind::Send,
            OpKind::Cancel,
            OpKind::LingerTimer,
            OpKind::EofWatch,
            OpKind::File,
            OpKind::RecvInto,
        ] {
            for (slot, generation) in [(0, 0), (7, 1), (u32::MAX, GENERATION_MASK), (12, GENERATION_MASK + 5)] {
                let tag = OpTag::conn_op(kind, slot, generation);
                assert_eq!(OpTag::decode(tag.encode()), Some(tag));
                assert_eq!(tag.generation, generation & GENERATION_MASK);
            }
        }
        assert_eq!(OpTag::decode(0), None);
        assert_eq!(OpTag::decode(u64::MAX), None);
    }
}
