//! Verification pattern: the content of a block is a pure function of (seed, block index).
//!
//! Because the content does not depend on *which* write put it there, concurrent or repeated
//! writes to the same block from different queues all leave the same bytes, so a read can be
//! checked without knowing the order in which writes landed. Every block starts with a header
//! (magic, seed, block index) so that a mismatch can be classified: stale data from an earlier
//! seed, a block written to the wrong place, or plain garbage.

/// Marks a block written by this tool ("vhi-lgen" in ASCII).
const MAGIC: u64 = 0x7668_692d_6c67_656e;

/// Number of header words at the start of each block.
const HEADER_WORDS: usize = 3;

/// Smallest block the pattern supports: the header must fit.
pub const MIN_BLOCK: usize = HEADER_WORDS * 8;

/// Byte a read buffer is filled with before a verifying read, so that a device that completes a
/// read without writing the buffer is told apart from one that returns wrong data.
pub const POISON: u8 = 0xa5;

/// One step of splitmix64: a cheap, well-mixed function so that neighbouring words and blocks
/// differ in every bit position.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Word `j` of the body of block `block` under `seed`.
fn body_word(seed: u64, block: u64, j: u64) -> u64 {
    splitmix64(seed ^ block.rotate_left(24) ^ j.rotate_left(48))
}

/// Fills `buf` (one block) with the pattern of `block` under `seed`. A trailing part shorter
/// than a word gets the low bytes of the next word.
pub fn fill(buf: &mut [u8], seed: u64, block: u64) {
    for (j, chunk) in buf.chunks_mut(8).enumerate() {
        let word = expected_word(seed, block, j);
        let bytes = word.to_le_bytes();
        let n = chunk.len();
        chunk.copy_from_slice(bytes.get(..n).unwrap_or(&bytes));
    }
}

fn expected_word(seed: u64, block: u64, j: usize) -> u64 {
    match j {
        0 => MAGIC,
        1 => seed,
        2 => block,
        _ => body_word(seed, block, j as u64),
    }
}

fn read_word(buf: &[u8], j: usize) -> Option<u64> {
    let start = j.checked_mul(8)?;
    let bytes: [u8; 8] = buf.get(start..start.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// What a block held when it did not match.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Found {
    /// A complete, valid block of this tool, but with another seed (stale or lost write).
    OtherSeed {
        /// Seed found in the header.
        seed: u64,
    },
    /// A complete, valid block of this tool that belongs at another block index (misdirected
    /// write or read).
    OtherBlock {
        /// Block index found in the header.
        block: u64,
    },
    /// The buffer still holds the poison it had before the read: the device reported success
    /// without transferring any data (e.g. a null backend).
    BufferUntouched,
    /// Anything else; `first_bad_byte` is the offset of the first differing byte in the block.
    Garbage {
        /// Offset inside the block of the first byte that differs from every accepted seed.
        first_bad_byte: usize,
    },
}

/// Checks `buf` (one block read from `block`) against each seed in `accepted`; returns `Ok(seed)`
/// for the first seed whose pattern it matches exactly, or what was found instead.
pub fn check(buf: &[u8], block: u64, accepted: &[u64]) -> Result<u64, Found> {
    for &seed in accepted {
        if first_mismatch(buf, seed, block).is_none() {
            return Ok(seed);
        }
    }
    // Classify. A valid header with a different seed or block whose body matches that header
    // tells the user much more than "garbage".
    if read_word(buf, 0) == Some(MAGIC) {
        if let (Some(seed), Some(found_block)) = (read_word(buf, 1), read_word(buf, 2)) {
            if first_mismatch(buf, seed, found_block).is_none() {
                return Err(if found_block != block {
                    Found::OtherBlock { block: found_block }
                } else {
                    Found::OtherSeed { seed }
                });
            }
        }
    }
    if buf.iter().all(|&b| b == POISON) {
        return Err(Found::BufferUntouched);
    }
    let first_bad_byte = accepted
        .first()
        .and_then(|&seed| first_mismatch(buf, seed, block))
        .unwrap_or(0);
    Err(Found::Garbage { first_bad_byte })
}

/// Offset of the first byte of `buf` that differs from the pattern, if any.
fn first_mismatch(buf: &[u8], seed: u64, block: u64) -> Option<usize> {
    for (j, chunk) in buf.chunks(8).enumerate() {
        let want = expected_word(seed, block, j).to_le_bytes();
        if let Some(i) = chunk.iter().zip(want.iter()).position(|(a, b)| a != b) {
            return Some(j * 8 + i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_accepts() {
        let mut b = vec![0u8; 4096];
        fill(&mut b, 7, 42);
        assert_eq!(check(&b, 42, &[7]), Ok(7));
        assert_eq!(check(&b, 42, &[9, 7]), Ok(7));
    }

    #[test]
    fn blocks_and_seeds_differ() {
        let mut a = vec![0u8; 512];
        let mut b = vec![0u8; 512];
        fill(&mut a, 1, 0);
        fill(&mut b, 1, 1);
        assert_ne!(a[24..], b[24..]);
        fill(&mut b, 2, 0);
        assert_ne!(a[24..], b[24..]);
    }

    #[test]
    fn classifies_stale_misplaced_and_garbage() {
        let mut b = vec![0u8; 4096];
        fill(&mut b, 5, 10);
        assert_eq!(check(&b, 10, &[6]), Err(Found::OtherSeed { seed: 5 }));
        assert_eq!(check(&b, 11, &[5]), Err(Found::OtherBlock { block: 10 }));
        fill(&mut b, 5, 10);
        b[1000] ^= 1;
        assert_eq!(
            check(&b, 10, &[5]),
            Err(Found::Garbage {
                first_bad_byte: 1000
            })
        );
        assert_eq!(check(&[POISON; 512], 10, &[5]), Err(Found::BufferUntouched));
        let zeros = vec![0u8; 4096];
        assert_eq!(
            check(&zeros, 10, &[5]),
            Err(Found::Garbage { first_bad_byte: 0 })
        );
    }

    #[test]
    fn odd_block_length() {
        let mut b = vec![0u8; 4 * 8 + 3];
        fill(&mut b, 3, 4);
        assert_eq!(check(&b, 4, &[3]), Ok(3));
        b[34] ^= 0x80;
        assert_eq!(
            check(&b, 4, &[3]),
            Err(Found::Garbage { first_bad_byte: 34 })
        );
    }
}
