//! Resolution of the "real" libc functions behind our hooks.
//!
//! Each hooked symbol has one typed [`Real`] cell: a `dlsym(RTLD_NEXT, name)` result cached
//! in an `AtomicPtr`. The cost on every call is one Relaxed load and a null test. The cells
//! are declared in one table with [`real_fns!`](crate::real_fns) (see [`crate::sys`]) and resolved all at
//! once at init, so no hook calls `dlsym` later (it is not async-signal-safe, and a hook may
//! run in a signal handler). Resolution never panics: a symbol that the next object does
//! not define (e.g. `close_range` on a glibc older than 2.34) makes [`Real::get`] return
//! `None`, and the hook answers `ENOSYS`.
//!
//! Races are benign: two threads resolving the same symbol store the same pointer.

use std::ffi::{c_void, CStr};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicPtr, Ordering};

/// A lazily resolved pointer to the next definition of a libc symbol, typed as its C
/// prototype `F` (an `unsafe extern "C" fn(...) -> ...` type).
pub struct Real<F> {
    name: &'static CStr,
    ptr: AtomicPtr<c_void>,
    ty: PhantomData<F>,
}

impl<F: Copy> Real<F> {
    /// A cell for the symbol `name`.
    ///
    /// # Safety
    /// `F` must be a function pointer type matching the C prototype of `name`.
    pub const unsafe fn new(name: &'static CStr) -> Self {
        assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut c_void>());
        Real {
            name,
            ptr: AtomicPtr::new(std::ptr::null_mut()),
            ty: PhantomData,
        }
    }

    /// The symbol's address, or `None` if no later object defines it.
    #[inline(always)]
    pub fn get(&self) -> Option<F> {
        let mut p = self.ptr.load(Ordering::Relaxed);
        if p.is_null() {
            p = self.resolve();
            if p.is_null() {
                return None;
            }
        }
        // SAFETY: `p` came from dlsym for `name`, whose prototype is `F` (the contract of
        // `new`); `F` is pointer-sized (asserted in `new`), and function and data pointers
        // have the same representation on the supported (Linux/glibc) targets.
        Some(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
    }

    /// `extern "C"` so that it cannot unwind: a hook's fast path then needs no landing pad
    /// (and saves no registers) for it.
    #[cold]
    #[inline(never)]
    extern "C" fn resolve(&self) -> *mut c_void {
        // SAFETY: `name` is a NUL-terminated C string with static lifetime; dlsym with
        // RTLD_NEXT is thread-safe and does not call any of the functions we interpose.
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) };
        if !p.is_null() {
            self.ptr.store(p, Ordering::Relaxed);
        }
        p
    }
}

/// Declares the table of real functions: one `pub static NAME: Real<prototype>` per line,
/// and `resolve_all()`, which resolves every one of them (called at init).
///
/// ```text
/// real_fns! {
///     CLOSE = c"close": unsafe extern "C" fn(c_int) -> c_int;
/// }
/// ```
#[macro_export]
#[doc(hidden)]
macro_rules! real_fns {
    ($($(#[$meta:meta])* $cell:ident = $name:literal: $ty:ty;)*) => {
        $(
            $(#[$meta])*
            // SAFETY: `$ty` is the C prototype of `$name` as glibc declares it.
            pub static $cell: $crate::real::Real<$ty> = unsafe { $crate::real::Real::new($name) };
        )*

        /// Resolve every real function now (called at init), so no hook needs `dlsym` later.
        pub fn resolve_all() {
            $(let _ = $cell.get();)*
        }
    };
}
