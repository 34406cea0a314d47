//! An intrusive FIFO list of boxed `IOEvent`s, linked through the events'
//! own `next` field, so grouping events (merging) allocates nothing.

use std::marker::PhantomData;
use std::ptr;

use crate::tasks::{IOCallbackCustom, IOEvent};

/// Owns its events: dropping the list drops them (without running callbacks).
pub struct EmbeddedList<C: IOCallbackCustom> {
    head: *mut IOEvent<C>,
    tail: *mut IOEvent<C>,
    len: usize,
}

// SAFETY: the list uniquely owns its boxed events, which are Send.
unsafe impl<C: IOCallbackCustom> Send for EmbeddedList<C> {}

impl<C: IOCallbackCustom> Default for EmbeddedList<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: IOCallbackCustom> EmbeddedList<C> {
    pub const fn new() -> Self {
        EmbeddedList { head: ptr::null_mut(), tail: ptr::null_mut(), len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push_back(&mut self, event: Box<IOEvent<C>>) {
        let node = Box::into_raw(event);
        // SAFETY: node comes from Box::into_raw, so it is valid and unaliased;
        // tail, when non-null, is a node this list owns.
        unsafe {
            (*node).next = ptr::null_mut();
            if self.tail.is_null() {
                self.head = node;
            } else {
                (*self.tail).next = node;
            }
        }
        self.tail = node;
        self.len += 1;
    }

    pub fn pop_front(&mut self) -> Option<Box<IOEvent<C>>> {
        if self.head.is_null() {
            return None;
        }
        let node = self.head;
        // SAFETY: head is a node this list owns (created by Box::into_raw in
        // push_back); unlinking it hands that ownership back to a Box.
        unsafe {
            self.head = (*node).next;
            (*node).next = ptr::null_mut();
            if self.head.is_null() {
                self.tail = ptr::null_mut();
            }
            self.len -= 1;
            Some(Box::from_raw(node))
        }
    }

    pub fn front(&self) -> Option<&IOEvent<C>> {
        // SAFETY: head is null or a node this list owns; the borrow is tied to &self.
        unsafe { self.head.as_ref() }
    }

    pub fn back(&self) -> Option<&IOEvent<C>> {
        // SAFETY: tail is null or a node this list owns; the borrow is tied to &self.
        unsafe { self.tail.as_ref() }
    }

    pub fn iter(&self) -> Iter<'_, C> {
        Iter { cur: self.head, _list: PhantomData }
    }

    pub fn iter_mut(&mut self) -> IterMut<'_, C> {
        IterMut { cur: self.head, _list: PhantomData }
    }
}

impl<C: IOCallbackCustom> Drop for EmbeddedList<C> {
    fn drop(&mut self) {
        while self.pop_front().is_some() {}
    }
}

pub struct Iter<'a, C: IOCallbackCustom> {
    cur: *mut IOEvent<C>,
    _list: PhantomData<&'a EmbeddedList<C>>,
}

impl<'a, C: IOCallbackCustom> Iterator for Iter<'a, C> {
    type Item = &'a IOEvent<C>;
    fn next(&mut self) -> Option<Self::Item> {
        // SAFETY: cur is null or a node owned by the list borrowed for 'a.
        let node = unsafe { self.cur.as_ref()? };
        self.cur = node.next;
        Some(node)
    }
}

pub struct IterMut<'a, C: IOCallbackCustom> {
    cur: *mut IOEvent<C>,
    _list: PhantomData<&'a mut EmbeddedList<C>>,
}

impl<'a, C: IOCallbackCustom> Iterator for IterMut<'a, C> {
    type Item = &'a mut IOEvent<C>;
    fn next(&mut self) -> Option<Self::Item> {
        // SAFETY: cur is null or a node owned by the list mutably borrowed for
        // 'a; each node is yielded once, so the &mut borrows do not overlap.
        let node = unsafe { self.cur.as_mut()? };
        self.cur = node.next;
        Some(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::{Buffer, ClosureCb, IOAction};

    #[test]
    fn fifo_order_and_ownership() {
        let mut list: EmbeddedList<ClosureCb> = EmbeddedList::new();
        assert!(list.pop_front().is_none());
        for i in 0..5u64 {
            list.push_back(IOEvent::new(1, Buffer::aligned(512).unwrap(), IOAction::Read, i * 512));
        }
        assert_eq!(list.len(), 5);
        assert_eq!(list.front().unwrap().offset(), 0);
        assert_eq!(list.back().unwrap().offset(), 2048);
        let offsets: Vec<u64> = list.iter().map(|e| e.offset()).collect();
        assert_eq!(offsets, vec![0, 512, 1024, 1536, 2048]);
        assert_eq!(list.pop_front().unwrap().offset(), 0);
        assert_eq!(list.len(), 4);
        // The rest is freed by Drop (checked by Miri/valgrind runs, not here).
    }
}
