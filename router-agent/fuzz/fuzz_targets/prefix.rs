//! The property both head targets check on the first half of their input: a prefix holds less
//! of the head, so parsing it can only be incomplete, refused, or, when the whole head already
//! fits in the prefix, give the very same head and the very same rewrite.
use std::fmt::Debug;

/// `half` parsed from a prefix of the input whose parse gave `full`; `head_len` reads a head's
/// length in bytes.
pub fn check_prefix<H: PartialEq + Debug, E: Debug>(
    full: &Result<Option<H>, E>,
    full_out: &[u8],
    half: &H,
    half_out: &[u8],
    head_len: impl Fn(&H) -> usize,
) {
    let Ok(Some(full_head)) = full else {
        panic!("first half parsed to {half:?}, whole input to {full:?}");
    };
    assert!(
        head_len(half) <= head_len(full_head),
        "head_len {} in the first half, {} in the whole input",
        head_len(half),
        head_len(full_head)
    );
    assert_eq!(half, full_head, "same head bytes, different result");
    assert_eq!(half_out, full_out, "same head bytes, different rewrite");
}
