//! Moving column blocks in and out of row-major `[batch, seq, width]` tensors.
//!
//! Sequential kernels (the scan, the linear-attention recurrences) own a block of columns of one
//! sequence for a whole pass; they fill a private `[seq, block]` buffer, which is then copied into
//! the shared output. Every output element has exactly one writer, so no order question arises.

/// Copies `src` (`[rows, block]`) into columns `col0..col0 + block` of `dst` (`[rows, width]`).
pub(crate) fn put_columns<T: Copy>(dst: &mut [T], width: usize, col0: usize, src: &[T], block: usize) {
    if block == 0 {
        return;
    }
    for (row, s) in dst.chunks_mut(width).zip(src.chunks(block)) {
        row[col0..col0 + block].copy_from_slice(s);
    }
}

/// Number of blocks of `size` needed to cover `n` (the last may be short).
pub(crate) fn block_count(n: usize, size: usize) -> usize {
    n.div_ceil(size)
}

/// Panics with the kernel and argument names when a buffer has the wrong length.
pub(crate) fn check_len<T>(kernel: &str, name: &str, x: &[T], want: usize) {
    assert!(x.len() == want, "{kernel}: `{name}` has {} elements, expected {want}", x.len());
}
