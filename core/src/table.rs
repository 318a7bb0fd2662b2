//! Fixed-capacity stream table: live streams, their lifecycle state and per-stream data.
//!
//! # Lifecycle
//!
//! ```text
//!   insert ──▶ Opening ──▶ Open ──▶ Closing ──▶ Closed (slot freed)
//!                 │                    ▲
//!                 └────────────────────┘
//! ```
//!
//! Legal transitions, and nothing else ([`StreamState::can_become`]):
//! * `Opening -> Open`: the upstream accepted the stream.
//! * `Opening -> Closing`: the upstream refused it, the dial timed out, or either side closed
//!   early.
//! * `Open -> Closing`: either side closed.
//! * `Closing -> Closed`: everything owed for the stream is delivered; the slot is freed at once,
//!   so no entry is ever observed in `Closed`.

use core::fmt;

use crate::stream_id::StreamId;

/// Where a stream is in its life. See the [module docs](self) for the legal transitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum StreamState {
    /// Registered; the upstream connection is being dialled.
    Opening,
    /// Both ends are connected; data flows.
    Open,
    /// A close was started; queued data is drained and the close delivered.
    Closing,
    /// Finished; the slot is free.
    Closed,
}

impl StreamState {
    /// Whether `self -> next` is a legal transition.
    #[must_use]
    pub const fn can_become(self, next: Self) -> bool {
        matches!(
            (self, next),
            (Self::Opening, Self::Open | Self::Closing)
                | (Self::Open, Self::Closing)
                | (Self::Closing, Self::Closed)
        )
    }
}

impl fmt::Display for StreamState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Opening => "opening",
            Self::Open => "open",
            Self::Closing => "closing",
            Self::Closed => "closed",
        })
    }
}

/// Why [`StreamTable::insert`] refused a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum InsertError {
    /// A live stream already has this id; it is left untouched.
    Duplicate,
    /// Every slot is taken.
    Full,
}

impl fmt::Display for InsertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Duplicate => "a stream with this id is already open",
            Self::Full => "stream table is full",
        })
    }
}

impl core::error::Error for InsertError {}

/// An illegal lifecycle transition was asked for; the entry keeps its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TransitionError {
    /// State the stream is in.
    pub from: StreamState,
    /// State that was asked for.
    pub to: StreamState,
}

impl fmt::Display for TransitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "illegal stream transition {} -> {}", self.from, self.to)
    }
}

impl core::error::Error for TransitionError {}

/// Position of a live entry in a [`StreamTable`]; valid until that entry is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Slot(usize);

impl Slot {
    /// The slot's index, in `0..N`.
    #[must_use]
    pub const fn index(self) -> usize {
        self.0
    }
}

/// One live stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<T> {
    id: StreamId,
    state: StreamState,
    /// Caller data kept with the stream.
    pub value: T,
}

impl<T> Entry<T> {
    /// The stream's id.
    #[must_use]
    pub const fn id(&self) -> &StreamId {
        &self.id
    }

    /// The stream's state; never [`StreamState::Closed`].
    #[must_use]
    pub const fn state(&self) -> StreamState {
        self.state
    }
}

/// At most `N` live streams, keyed by id, each with a `T`.
///
/// Without the `alloc` feature storage is inline: `N * size_of::<Option<Entry<T>>>()` bytes whether
/// streams are live or not. With `alloc` the slots live on the heap and grow on demand up to `N`
/// (never shrinking below the most streams ever live at once), so a large `N` costs nothing until
/// used. Lookups by id scan the slots in use. Slots are stable: an entry stays in its [`Slot`]
/// until removed, which makes round-robin scheduling over slots fair.
#[derive(Debug)]
pub struct StreamTable<T, const N: usize> {
    slots: Slots<T, N>,
    len: usize,
}

#[cfg(feature = "alloc")]
type Slots<T, const N: usize> = alloc::vec::Vec<Option<Entry<T>>>;
#[cfg(not(feature = "alloc"))]
type Slots<T, const N: usize> = [Option<Entry<T>>; N];

impl<T, const N: usize> Default for StreamTable<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const N: usize> StreamTable<T, N> {
    /// An empty table.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            #[cfg(feature = "alloc")]
            slots: alloc::vec::Vec::new(),
            #[cfg(not(feature = "alloc"))]
            slots: [const { None }; N],
            len: 0,
        }
    }

    /// Number of live streams.
    #[must_use]
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether no stream is live.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most streams the table holds.
    #[must_use]
    pub const fn capacity(&self) -> usize {
        N
    }

    /// Adds a stream in state [`StreamState::Opening`].
    ///
    /// # Errors
    /// [`InsertError::Duplicate`] if `id` is live (that stream is not touched),
    /// [`InsertError::Full`] if all `N` slots are taken. `value` is dropped on error.
    pub fn insert(&mut self, id: StreamId, value: T) -> Result<Slot, InsertError> {
        if self.find(id.as_str()).is_some() {
            return Err(InsertError::Duplicate);
        }
        let free = match self.slots.iter().position(Option::is_none) {
            Some(free) => free,
            #[cfg(feature = "alloc")]
            None if self.slots.len() < N => {
                self.slots.push(None);
                self.slots.len() - 1
            }
            None => return Err(InsertError::Full),
        };
        self.slots[free] = Some(Entry {
            id,
            state: StreamState::Opening,
            value,
        });
        self.len += 1;
        Ok(Slot(free))
    }

    /// The slot of the live stream named `id`.
    #[must_use]
    pub fn find(&self, id: &str) -> Option<Slot> {
        self.slots
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| e.id.as_str() == id))
            .map(Slot)
    }

    /// The live stream named `id`.
    #[must_use]
    pub fn get(&self, id: &str) -> Option<&Entry<T>> {
        self.find(id).and_then(|s| self.at(s))
    }

    /// The live stream named `id`, mutably.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Entry<T>> {
        self.find(id).and_then(|s| self.at_mut(s))
    }

    /// The entry in `slot`, if live.
    #[must_use]
    pub fn at(&self, slot: Slot) -> Option<&Entry<T>> {
        self.slots.get(slot.0).and_then(Option::as_ref)
    }

    /// The entry in `slot`, if live, mutably.
    pub fn at_mut(&mut self, slot: Slot) -> Option<&mut Entry<T>> {
        self.slots.get_mut(slot.0).and_then(Option::as_mut)
    }

    /// Moves the stream in `slot` to `to`. Moving to [`StreamState::Closed`] removes the entry and
    /// returns it; other transitions return `None`.
    ///
    /// # Errors
    /// [`TransitionError`] if the transition is illegal or `slot` is empty (reported as `Closed ->
    /// to`); the entry is unchanged.
    pub fn transition(
        &mut self,
        slot: Slot,
        to: StreamState,
    ) -> Result<Option<Entry<T>>, TransitionError> {
        let entry = self.at_mut(slot).ok_or(TransitionError {
            from: StreamState::Closed,
            to,
        })?;
        if !entry.state.can_become(to) {
            return Err(TransitionError {
                from: entry.state,
                to,
            });
        }
        entry.state = to;
        if to == StreamState::Closed {
            self.len -= 1;
            return Ok(self.slots[slot.0].take());
        }
        Ok(None)
    }

    /// Live entries with their slots, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (Slot, &Entry<T>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (Slot(i), e)))
    }

    /// Live entries with their slots, in slot order, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Slot, &mut Entry<T>)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, e)| e.as_mut().map(|e| (Slot(i), e)))
    }

    /// Slots of live entries in round-robin order: the first live slot after `after`, wrapping,
    /// ending with `after` itself. With `after == None` the order starts at slot 0.
    pub fn round_robin(&self, after: Option<Slot>) -> impl Iterator<Item = Slot> + '_ {
        let used = self.slots.len();
        let start = after.map_or(0, |s| s.0 + 1);
        (0..used)
            .map(move |k| (start + k) % used.max(1))
            .filter(|&i| self.slots[i].is_some())
            .map(Slot)
    }

    /// Every slot that may hold an entry, in slot order. Holds no borrow, so the table can change
    /// while they are walked: look each one up and skip empty ones.
    pub(crate) fn live_slots(&self) -> impl Iterator<Item = Slot> + use<T, N> {
        (0..self.slots.len()).map(Slot)
    }

    /// Every slot that may hold an entry in round-robin order: the one after `after` first,
    /// wrapping, ending with `after` itself. Holds no borrow, so the table can change while they
    /// are walked: look each one up and skip empty ones.
    pub(crate) fn slots_after(
        &self,
        after: Option<Slot>,
    ) -> impl Iterator<Item = Slot> + use<T, N> {
        let used = self.slots.len();
        let start = after.map_or(0, |s| s.0 + 1);
        (0..used).map(move |k| Slot((start + k) % used))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn id(s: &str) -> StreamId {
        StreamId::new(s).unwrap()
    }

    #[test]
    fn lifecycle_and_lookup() {
        let mut t: StreamTable<u32, 2> = StreamTable::new();
        let a = t.insert(id("a"), 1).unwrap();
        assert_eq!(t.get("a").unwrap().state(), StreamState::Opening);
        assert_eq!(t.transition(a, StreamState::Open), Ok(None));
        assert_eq!(
            t.transition(a, StreamState::Opening).unwrap_err(),
            TransitionError {
                from: StreamState::Open,
                to: StreamState::Opening
            }
        );
        assert_eq!(
            t.transition(a, StreamState::Closed).unwrap_err(),
            TransitionError {
                from: StreamState::Open,
                to: StreamState::Closed
            }
        );
        t.transition(a, StreamState::Closing).unwrap();
        let gone = t.transition(a, StreamState::Closed).unwrap().unwrap();
        assert_eq!((gone.id().as_str(), gone.value), ("a", 1));
        assert!(t.is_empty() && t.get("a").is_none());
        assert_eq!(
            t.transition(a, StreamState::Open).unwrap_err().from,
            StreamState::Closed
        );
    }

    #[test]
    fn duplicate_and_full_are_refused() {
        let mut t: StreamTable<u32, 2> = StreamTable::new();
        let a = t.insert(id("a"), 1).unwrap();
        t.transition(a, StreamState::Open).unwrap();
        assert_eq!(t.insert(id("a"), 2), Err(InsertError::Duplicate));
        let live = t.get("a").unwrap();
        assert_eq!((live.state(), live.value), (StreamState::Open, 1));
        t.insert(id("b"), 3).unwrap();
        assert_eq!(t.insert(id("c"), 4), Err(InsertError::Full));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn round_robin_wraps_after_cursor() {
        let mut t: StreamTable<(), 4> = StreamTable::new();
        for s in ["a", "b", "c"] {
            t.insert(id(s), ()).unwrap();
        }
        let order: Vec<usize> = t.round_robin(Some(Slot(1))).map(Slot::index).collect();
        assert_eq!(order, [2, 0, 1]);
        let order: Vec<usize> = t.round_robin(None).map(Slot::index).collect();
        assert_eq!(order, [0, 1, 2]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8),
        Advance(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..12).prop_map(Op::Insert),
            (0u8..12, 0u8..4).prop_map(|(i, s)| Op::Advance(i, s))
        ]
    }

    const STATES: [StreamState; 4] = [
        StreamState::Opening,
        StreamState::Open,
        StreamState::Closing,
        StreamState::Closed,
    ];

    proptest! {
        /// Against a model: never above capacity, duplicates refused without touching the live
        /// entry, illegal transitions refused, lookups agree.
        #[test]
        fn table_matches_model(ops in proptest::collection::vec(op(), 0..200)) {
            let mut t: StreamTable<u32, 5> = StreamTable::new();
            let mut model: Vec<(std::string::String, StreamState, u32)> = Vec::new();
            for (n, op) in ops.into_iter().enumerate() {
                let n = u32::try_from(n).unwrap();
                match op {
                    Op::Insert(i) => {
                        let name = std::format!("s{i}");
                        let r = t.insert(id(&name), n);
                        if let Some(m) = model.iter().find(|m| m.0 == name) {
                            prop_assert_eq!(r, Err(InsertError::Duplicate));
                            prop_assert_eq!(t.get(&name).map(|e| (e.state(), e.value)), Some((m.1, m.2)));
                        } else if model.len() == 5 {
                            prop_assert_eq!(r, Err(InsertError::Full));
                        } else {
                            prop_assert!(r.is_ok());
                            model.push((name, StreamState::Opening, n));
                        }
                    }
                    Op::Advance(i, s) => {
                        let name = std::format!("s{i}");
                        let to = STATES[usize::from(s)];
                        let Some(slot) = t.find(&name) else {
                            prop_assert!(!model.iter().any(|m| m.0 == name));
                            continue;
                        };
                        let pos = model.iter().position(|m| m.0 == name).unwrap();
                        let r = t.transition(slot, to);
                        if model[pos].1.can_become(to) {
                            prop_assert!(r.is_ok());
                            if to == StreamState::Closed { model.remove(pos); } else { model[pos].1 = to; }
                        } else {
                            prop_assert!(r.is_err());
                        }
                    }
                }
                prop_assert!(t.len() <= 5);
                prop_assert_eq!(t.len(), model.len());
                prop_assert_eq!(t.iter().count(), model.len());
            }
        }
    }
}
