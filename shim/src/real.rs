//! Resolution of the "real" libc functions behind our hooks.
//!
//! Each hooked symbol has one [`Real`] cell: a `dlsym(RTLD_NEXT, name)` result cached in an
//! `AtomicPtr`. The cost on every call is one atomic load. Resolution never panics: a symbol
//! that the next object does not define (e.g. `close_range` on a glibc older than 2.34) makes
//! [`Real::get`] return `None`, and the hook answers `ENOSYS`.
//!
//! Races are benign: two threads resolving the same symbol store the same pointer.
//!
//! The simple, always-present POSIX calls (socket, bind, listen, ...) use `redhook::hook!`
//! instead; see [`crate::hooks::sock`].

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicPtr, Ordering};

/// A lazily resolved pointer to the next definition of a libc symbol.
pub struct Real {
    name: &'static CStr,
    ptr: AtomicPtr<c_void>,
}

impl Real {
    pub const fn new(name: &'static CStr) -> Self {
        Real {
            name,
            ptr: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// The symbol's address, or `None` if no later object defines it.
    #[inline(always)]
    pub fn get(&self) -> Option<*mut c_void> {
        let p = self.ptr.load(Ordering::Relaxed);
        if !p.is_null() {
            return Some(p);
        }
        self.resolve()
    }

    /// The cached address only (no resolution): for fast paths that fall back to a slow
    /// path which resolves.
    #[inline(always)]
    pub fn loaded(&self) -> Option<*mut c_void> {
        let p = self.ptr.load(Ordering::Relaxed);
        (!p.is_null()).then_some(p)
    }

    #[cold]
    #[inline(never)]
    fn resolve(&self) -> Option<*mut c_void> {
        // SAFETY: `name` is a NUL-terminated C string with static lifetime; dlsym with
        // RTLD_NEXT is thread-safe and does not call any of the functions we interpose.
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) };
        if p.is_null() {
            return None;
        }
        self.ptr.store(p, Ordering::Relaxed);
        Some(p)
    }
}

/// Declares typed accessors for the real function: `real_fn!(CLOSE, close, close_loaded,
/// c"close", unsafe extern "C" fn(c_int) -> c_int)` defines the cell `CLOSE`, `fn close()`
/// (resolving) and `fn close_loaded()` (cached pointer only).
#[macro_export]
#[doc(hidden)]
macro_rules! real_fn {
    ($cell:ident, $getter:ident, $loaded:ident, $name:literal, $ty:ty) => {
        static $cell: $crate::real::Real = $crate::real::Real::new($name);

        /// Typed pointer to the real function (None if not defined after us).
        #[inline(always)]
        pub fn $getter() -> Option<$ty> {
            // SAFETY: the pointer was returned by dlsym for this exact symbol, whose C
            // prototype is `$ty`; function pointers and data pointers have the same size
            // and representation on the supported (Linux/glibc) targets.
            $cell
                .get()
                .map(|p| unsafe { std::mem::transmute::<*mut std::ffi::c_void, $ty>(p) })
        }

        /// Typed pointer to the real function if already resolved (no dlsym).
        #[inline(always)]
        #[allow(dead_code)]
        pub fn $loaded() -> Option<$ty> {
            // SAFETY: as for the resolving getter.
            $cell
                .loaded()
                .map(|p| unsafe { std::mem::transmute::<*mut std::ffi::c_void, $ty>(p) })
        }
    };
}
