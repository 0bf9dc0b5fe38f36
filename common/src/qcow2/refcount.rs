//! Refcount block entries of any width from 1 to 64 bits.

/// Read entry `index` of a refcount block with entries `1 << order` bits wide.
pub fn get(block: &[u8], order: u32, index: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[index / per_byte];
            let shift = (index % per_byte) * bits;
            u64::from((byte >> shift) & mask8(bits))
        }
        3 => u64::from(block[index]),
        4 => u64::from(u16::from_be_bytes([block[2 * index], block[2 * index + 1]])),
        5 => u64::from(u32::from_be_bytes(
            block[4 * index..4 * index + 4].try_into().unwrap(),
        )),
        _ => u64::from_be_bytes(block[8 * index..8 * index + 8].try_into().unwrap()),
    }
}

fn mask8(bits: usize) -> u8 {
    ((1u16 << bits) - 1) as u8
}

/// Largest refcount an entry of `order` can hold.
pub fn max_value(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    }
}

/// Write `value` (which must fit, see [`max_value`]) into entry `index`.
pub fn set(block: &mut [u8], order: u32, index: usize, value: u64) {
    debug_assert!(value <= max_value(order));
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let m = mask8(bits) << shift;
            let b = &mut block[index / per_byte];
            *b = (*b & !m) | (((value as u8) << shift) & m);
        }
        3 => block[index] = value as u8,
        4 => block[2 * index..2 * index + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * index..4 * index + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * index..8 * index + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            let max = max_value(order);
            for i in 0..entries {
                set(&mut block, order, i, (i as u64 * 7 + 3) & max);
            }
            for i in 0..entries {
                assert_eq!(
                    get(&block, order, i),
                    (i as u64 * 7 + 3) & max,
                    "order {order} i {i}"
                );
            }
            set(&mut block, order, 5, max);
            assert_eq!(get(&block, order, 5), max);
            assert_eq!(get(&block, order, 4), (4 * 7 + 3) & max);
            assert_eq!(get(&block, order, 6), (6 * 7 + 3) & max);
        }
    }

    #[test]
    fn sub_byte_order_is_lsb_first() {
        let mut block = vec![0u8; 1];
        set(&mut block, 0, 0, 1);
        assert_eq!(block[0], 1);
        set(&mut block, 0, 7, 1);
        assert_eq!(block[0], 0x81);
    }
}
