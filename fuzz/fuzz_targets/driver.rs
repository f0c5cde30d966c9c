//! libFuzzer's driver, started from a Rust `main`. The MLIR libraries weft links include
//! `libMLIRMlirOptMain.a`, which defines a C `main` (mlir-opt's) that the linker may pick over
//! libFuzzer's: the fuzzer would then run mlir-opt on its arguments. A `main` in the target
//! itself always wins, and hands libFuzzer its arguments.

use std::ffi::{c_char, c_int, CString};

extern "C" {
    fn LLVMFuzzerRunDriver(
        argc: *mut c_int,
        argv: *mut *mut *mut c_char,
        callback: extern "C" fn(*const u8, usize) -> c_int,
    ) -> c_int;
    fn LLVMFuzzerTestOneInput(data: *const u8, size: usize) -> c_int;
}

extern "C" fn one_input(data: *const u8, size: usize) -> c_int {
    // SAFETY: libFuzzer passes a buffer of `size` bytes; the callee is the target's entry.
    unsafe { LLVMFuzzerTestOneInput(data, size) }
}

pub fn run() {
    let args: Vec<CString> = std::env::args().map(|a| CString::new(a).expect("no NUL in arguments")).collect();
    let mut ptrs: Vec<*mut c_char> = args.iter().map(|a| a.as_ptr() as *mut c_char).collect();
    ptrs.push(std::ptr::null_mut());
    let mut argc = args.len() as c_int;
    let mut argv = ptrs.as_mut_ptr();
    // SAFETY: argv is a NULL-terminated array of C strings that outlive the call.
    let code = unsafe { LLVMFuzzerRunDriver(&mut argc, &mut argv, one_input) };
    std::process::exit(code);
}
