//! Seedable generators, so that every random choice the toolkit makes
//! outside Burn's tensors (DARE masks, sampling, data shuffles) is the same on
//! every machine for a given seed ([`SplitMix64`]), and so that values PEFT
//! draws from a seeded `torch.Generator` (VeRA's projections) are drawn here
//! bit for bit ([`TorchGenerator`]).

/// SplitMix64 (Steele, Lea & Flood, 2014).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Shuffles `v` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// PyTorch's CPU generator (`torch.Generator().manual_seed(seed)`): the
/// 32-bit Mersenne Twister MT19937 seeded with the low 32 bits of the seed,
/// and `Tensor.uniform_`'s float transform of its draws.
#[derive(Clone)]
pub struct TorchGenerator {
    state: Box<[u32; 624]>,
    index: usize,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TorchGenerator {{ index: {} }}", self.index)
    }
}

impl TorchGenerator {
    /// `torch.Generator().manual_seed(seed)`; a negative seed maps to
    /// `0xffff_ffff_ffff_ffff + seed`, as `manual_seed` documents.
    pub fn manual_seed(seed: i64) -> Self {
        let seed = if seed < 0 {
            u64::MAX.wrapping_add(seed as u64)
        } else {
            seed as u64
        };
        let mut state = Box::new([0u32; 624]);
        state[0] = seed as u32;
        for j in 1..624 {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        TorchGenerator { state, index: 624 }
    }

    /// The next 32 random bits (`generator->random()`).
    pub fn next_u32(&mut self) -> u32 {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.state[i] & UPPER) | (self.state[(i + 1) % 624] & LOWER);
                let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
                self.state[i] = self.state[(i + 397) % 624] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `torch.empty(n).uniform_(from, to, generator=g)` for `float32`: each
    /// value is the low 24 bits of one draw over 2²⁴, scaled in `f32`.
    pub fn uniform_f32(&mut self, n: usize, from: f64, to: f64) -> Vec<f32> {
        let (from, to) = (from as f32, to as f32);
        (0..n)
            .map(|_| {
                let x = (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0);
                x * (to - from) + from
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_uniform_enough() {
        let a: Vec<u64> = (0..4)
            .scan(SplitMix64(1), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..4)
            .scan(SplitMix64(1), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        let mut r = SplitMix64(9);
        let mean = (0..10_000).map(|_| r.next_f64()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        let mut v: Vec<u32> = (0..50).collect();
        SplitMix64(3).shuffle(&mut v);
        assert_ne!(v, (0..50).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
    }

    /// The first draws of `torch.Generator().manual_seed(0)` and of seed
    /// 42, as PyTorch 2.15 gives them (`torch.empty(3).uniform_(0, 1,
    /// generator=g)`), and the reference MT19937 output for seed 5489.
    #[test]
    fn torch_generator_draws_what_pytorch_draws() {
        let mut g = TorchGenerator::manual_seed(0);
        assert_eq!(g.next_u32(), 2_357_136_044);
        let got = TorchGenerator::manual_seed(0).uniform_f32(3, 0.0, 1.0);
        assert_eq!(got, vec![0.496_256_6_f32, 0.768_221_8, 0.088_477_43]);
        // The 10,000th output of the reference MT19937 (C++11 requires it).
        let mut g = TorchGenerator::manual_seed(5489);
        let last = (0..10_000).map(|_| g.next_u32()).last().unwrap();
        assert_eq!(last, 4_123_659_995);
        let scaled = TorchGenerator::manual_seed(0).uniform_f32(2, -1.0, 1.0);
        assert_eq!(scaled, vec![-0.007_486_82_f32, 0.536_443_6]);
    }
}
