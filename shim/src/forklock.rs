//! parking_lot locks that a fork child can re-initialise.
//!
//! After fork() the child has one thread. A lock that the parent's fork handler held must be
//! released in the child; unlocking a parking_lot lock that had waiters takes the slow path
//! into parking_lot's global parking table, whose bucket locks another parent thread may
//! have held at the instant of fork. So the child instead *re-initialises* the lock word,
//! which needs the raw lock to sit in an `UnsafeCell` we own.

use parking_lot::lock_api::{RawMutex as _, RawRwLock as _};
use parking_lot::{RawMutex, RawRwLock};
use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};

/// A `parking_lot::RawRwLock` that can be reset in a fork child.
pub struct ForkRwLock(UnsafeCell<RawRwLock>);

// SAFETY: the raw lock is itself Sync; the UnsafeCell is only written by `reset_in_child`,
// whose contract excludes concurrent use.
unsafe impl Sync for ForkRwLock {}

impl ForkRwLock {
    pub const fn new() -> Self {
        ForkRwLock(UnsafeCell::new(RawRwLock::INIT))
    }
    pub fn raw(&self) -> &RawRwLock {
        // SAFETY: only `reset_in_child` writes the cell, with no references alive.
        unsafe { &*self.0.get() }
    }
    /// # Safety
    /// Only in a fork child (single thread), with no guard of this lock alive.
    pub unsafe fn reset_in_child(&self) {
        // SAFETY: per the contract, nothing else observes the lock.
        unsafe { *self.0.get() = RawRwLock::INIT };
    }
}

impl Default for ForkRwLock {
    fn default() -> Self {
        Self::new()
    }
}

/// A mutex (parking_lot::RawMutex) around `T` that can be reset in a fork child.
pub struct ForkMutex<T> {
    raw: UnsafeCell<RawMutex>,
    data: UnsafeCell<T>,
}

// SAFETY: standard mutex reasoning: `data` is only reached through a guard that holds `raw`.
unsafe impl<T: Send> Sync for ForkMutex<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for ForkMutex<T> {}

pub struct ForkMutexGuard<'a, T>(&'a ForkMutex<T>);

impl<T> ForkMutex<T> {
    pub const fn new(v: T) -> Self {
        ForkMutex {
            raw: UnsafeCell::new(RawMutex::INIT),
            data: UnsafeCell::new(v),
        }
    }
    fn raw(&self) -> &RawMutex {
        // SAFETY: only `reset_in_child` writes the cell, with no references alive.
        unsafe { &*self.raw.get() }
    }
    pub fn lock(&self) -> ForkMutexGuard<'_, T> {
        self.raw().lock();
        ForkMutexGuard(self)
    }
    /// Lock without a guard (fork prepare).
    pub(crate) fn lock_raw(&self) {
        self.raw().lock();
    }
    /// # Safety
    /// The current thread locked it with `lock_raw`.
    pub(crate) unsafe fn unlock_raw(&self) {
        // SAFETY: per the contract.
        unsafe { self.raw().unlock() };
    }
    /// # Safety
    /// Only in a fork child (single thread), with no guard alive.
    pub(crate) unsafe fn reset_in_child(&self) {
        // SAFETY: per the contract, nothing else observes the lock.
        unsafe { *self.raw.get() = RawMutex::INIT };
    }
}

impl<T> Deref for ForkMutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.0.data.get() }
    }
}
impl<T> DerefMut for ForkMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock exclusively.
        unsafe { &mut *self.0.data.get() }
    }
}
impl<T> Drop for ForkMutexGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: the guard holds the lock.
        unsafe { self.0.raw().unlock() };
    }
}
