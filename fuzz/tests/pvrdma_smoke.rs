//! Stable smoke run of the PVRDMA harness: pseudo-random command streams (the same code
//! libFuzzer drives), biased towards real command numbers and small handles, plus a
//! verbs-like sequence, so a panic or a broken invariant fails `cargo test` here.

use vmm_fuzz::pvrdma::run_counted;

#[test]
fn pvrdma_survives_random_commands() {
    let mut next = vmm_fuzz::xorshift(0x853c_49e6_748f_ea9b);
    let mut accepted = 0;
    for _ in 0..1500 {
        let mut data = vec![next() as u8 & 1];
        for _ in 0..(next() % 40) {
            let kind = (next() % 8) as u8;
            data.push(kind);
            if kind < 2 {
                data.push((next() % 18) as u8);
                for i in 0..40 {
                    // Small values make handles and counts hit existing objects.
                    let v = next();
                    data.push(if i % 4 == 0 {
                        (v % 4) as u8
                    } else if v.is_multiple_of(3) {
                        v as u8
                    } else {
                        0
                    });
                }
            } else {
                for _ in 0..12 {
                    data.push(next() as u8);
                }
            }
        }
        accepted += run_counted(&data);
    }
    assert!(
        accepted > 100,
        "only {accepted} commands accepted: the stream is too random"
    );
}

/// QUERY_PORT, CREATE_PD (kernel), CREATE_PD of a missing context, a DMA MR, a port flap.
#[test]
fn pvrdma_verbs_like_sequence() {
    let mut data = vec![0u8];
    let mut command = |c: u8, fields: &[u8]| {
        data.push(0);
        data.push(c);
        let mut f = [0u8; 40];
        f[..fields.len()].copy_from_slice(fields);
        data.extend_from_slice(&f);
    };
    command(0, &[1]); // QUERY_PORT port 1
    command(2, &[0]); // CREATE_PD, kernel
    command(2, &[9]); // CREATE_PD of context 9: refused
    // CREATE_MR: start, length, pdir 0, pd 1, access 7, flags DMA.
    let mut mr = [0u8; 40];
    mr[24] = 1;
    mr[28] = 7;
    mr[32] = 1;
    command(4, &mr);
    command(99, &[]); // unknown
    data.extend_from_slice(&[5, 0]); // port down
    data.extend_from_slice(&[5, 1]); // port up
    assert_eq!(run_counted(&data), 3);
}
