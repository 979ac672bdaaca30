//! Measuring a scheduler: entitlements, Jain's fairness index, latency percentiles.
//!
//! **Entitlement.** What a VM *should* get is its weighted max-min fair share: host CPU
//! capacity is divided in proportion to weight, except that no VM is given more than it can
//! use (its cap, or one CPU per vCPU); what such a VM cannot use is divided among the others,
//! again by weight ("water filling", [`entitlements`]).
//!
//! **Fairness.** A VM's *ratio* is its measured share of the CPU time handed out divided by
//! its entitlement's share of the total entitlement; 1.0 is perfect. Jain's index over the
//! ratios, `(Σx)² / (n·Σx²)`, is 1.0 when all VMs got exactly their entitlement and falls
//! towards `1/n` as one VM takes everything ([`jain_index`]). Because ratios are relative to
//! entitlement, this is the *weighted* Jain index.
//!
//! **Latency.** [`LatencyHistogram`] is a log-linear histogram (32 buckets per power of two,
//! so percentiles are exact to about 3%) with constant memory, so the executor can record
//! every wake-to-run latency of a long-running VM host.

/// What one VM may use, for [`entitlements`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Demand {
    /// The VM's weight.
    pub weight: f64,
    /// The most CPUs it can use: its cap (in CPUs) or its number of runnable vCPUs,
    /// whichever is smaller.
    pub limit: f64,
}

/// Weighted max-min fair shares of `cpus` host CPUs among `demands`, in CPUs.
///
/// ```
/// use vmkit_sched::metrics::{entitlements, Demand};
/// // Two CPUs; the second VM has weight 3 but only one vCPU.
/// let e = entitlements(2.0, &[Demand { weight: 1.0, limit: 4.0 }, Demand { weight: 3.0, limit: 1.0 }]);
/// assert!((e[0] - 1.0).abs() < 1e-9 && (e[1] - 1.0).abs() < 1e-9);
/// ```
pub fn entitlements(cpus: f64, demands: &[Demand]) -> Vec<f64> {
    let mut share = vec![0.0; demands.len()];
    let mut open: Vec<usize> = (0..demands.len())
        .filter(|&i| demands[i].weight > 0.0 && demands[i].limit > 0.0)
        .collect();
    let mut capacity = cpus.max(0.0);
    while !open.is_empty() && capacity > 1e-12 {
        let total: f64 = open.iter().map(|&i| demands[i].weight).sum();
        let saturated: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&i| capacity * demands[i].weight / total >= demands[i].limit)
            .collect();
        if saturated.is_empty() {
            for &i in &open {
                share[i] = capacity * demands[i].weight / total;
            }
            break;
        }
        for &i in &saturated {
            share[i] = demands[i].limit;
            capacity -= demands[i].limit;
        }
        open.retain(|i| !saturated.contains(i));
    }
    share
}

/// Jain's fairness index of `xs`: 1.0 when all are equal, `1/n` when one has everything.
/// An empty or all-zero input is perfectly fair (1.0).
pub fn jain_index(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let sum_sq: f64 = xs.iter().map(|x| x * x).sum();
    if xs.is_empty() || sum_sq == 0.0 {
        return 1.0;
    }
    sum * sum / (xs.len() as f64 * sum_sq)
}

/// One VM's line in a [`FairnessReport`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VmShare {
    /// Fraction of all CPU time handed out that this VM got.
    pub share: f64,
    /// Fraction it was entitled to.
    pub entitled: f64,
    /// `share / entitled` (1.0: exactly its entitlement).
    pub ratio: f64,
}

/// Shares vs entitlements of a set of VMs, and the weighted Jain index.
#[derive(Clone, Debug, PartialEq)]
pub struct FairnessReport {
    /// One entry per VM, in the order given.
    pub vms: Vec<VmShare>,
    /// Jain's index over the ratios.
    pub jain: f64,
}

impl FairnessReport {
    /// Compare measured `service` (any unit: nanoseconds, loop iterations) with
    /// `entitlement` (any unit). VMs entitled to nothing are left out of the index.
    pub fn new(service: &[f64], entitlement: &[f64]) -> Self {
        let total_s: f64 = service.iter().sum();
        let total_e: f64 = entitlement.iter().sum();
        let vms: Vec<VmShare> = service
            .iter()
            .zip(entitlement)
            .map(|(&s, &e)| {
                let share = if total_s > 0.0 { s / total_s } else { 0.0 };
                let entitled = if total_e > 0.0 { e / total_e } else { 0.0 };
                let ratio = if entitled > 0.0 {
                    share / entitled
                } else {
                    0.0
                };
                VmShare {
                    share,
                    entitled,
                    ratio,
                }
            })
            .collect();
        let ratios: Vec<f64> = vms
            .iter()
            .filter(|v| v.entitled > 0.0)
            .map(|v| v.ratio)
            .collect();
        FairnessReport {
            jain: jain_index(&ratios),
            vms,
        }
    }

    /// The largest `|ratio - 1|` over VMs with an entitlement.
    pub fn max_deviation(&self) -> f64 {
        self.vms
            .iter()
            .filter(|v| v.entitled > 0.0)
            .map(|v| (v.ratio - 1.0).abs())
            .fold(0.0, f64::max)
    }
}

const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

/// A constant-memory log-linear histogram of nanosecond values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    count: u64,
    max: u64,
    sum: u128,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS],
            count: 0,
            max: 0,
            sum: 0,
        }
    }
}

fn bucket(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let mantissa = (v >> (exp - SUB_BITS)) as usize & (SUB - 1);
    (exp - SUB_BITS + 1) as usize * SUB + mantissa
}

/// The largest value that falls in bucket `b`.
fn bucket_high(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let exp = (b / SUB) as u32 + SUB_BITS - 1;
    let mantissa = (b % SUB) as u64;
    let low = (SUB as u64 + mantissa) << (exp - SUB_BITS);
    low.saturating_add((1u64 << (exp - SUB_BITS)) - 1)
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record one value.
    pub fn record(&mut self, ns: u64) {
        if let Some(c) = self.counts.get_mut(bucket(ns)) {
            *c += 1;
        }
        self.count += 1;
        self.max = self.max.max(ns);
        self.sum += u128::from(ns);
    }

    /// Add all values of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest value recorded (0 if none).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The mean (0 if none).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The value below or at which a fraction `q` (0.0..=1.0) of the values lie, rounded up
    /// to its bucket's upper edge (never above the maximum). 0 if empty.
    pub fn percentile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_high(b).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entitlement_is_proportional_when_nobody_saturates() {
        let d: Vec<Demand> = [1.0, 2.0, 4.0]
            .iter()
            .map(|&w| Demand {
                weight: w,
                limit: 8.0,
            })
            .collect();
        let e = entitlements(7.0, &d);
        assert!((e[0] - 1.0).abs() < 1e-9);
        assert!((e[1] - 2.0).abs() < 1e-9);
        assert!((e[2] - 4.0).abs() < 1e-9);
    }

    #[test]
    fn entitlement_redistributes_what_a_capped_vm_cannot_use() {
        let d = [
            Demand {
                weight: 1.0,
                limit: 0.25,
            },
            Demand {
                weight: 1.0,
                limit: 4.0,
            },
            Demand {
                weight: 2.0,
                limit: 4.0,
            },
            Demand {
                weight: 0.0,
                limit: 4.0,
            },
        ];
        let e = entitlements(1.0, &d);
        assert!((e[0] - 0.25).abs() < 1e-9);
        assert!((e[1] - 0.25).abs() < 1e-9);
        assert!((e[2] - 0.5).abs() < 1e-9);
        assert_eq!(e[3], 0.0);
        // Everyone saturated: capacity is left over.
        let e = entitlements(8.0, &d[..2]);
        assert!((e[0] - 0.25).abs() < 1e-9 && (e[1] - 4.0).abs() < 1e-9);
    }

    #[test]
    fn jain_bounds() {
        assert_eq!(jain_index(&[]), 1.0);
        assert_eq!(jain_index(&[0.0, 0.0]), 1.0);
        assert!((jain_index(&[3.0, 3.0, 3.0]) - 1.0).abs() < 1e-12);
        assert!((jain_index(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn fairness_report_ratios() {
        let r = FairnessReport::new(&[10.0, 20.0, 40.0], &[1.0, 2.0, 4.0]);
        assert!((r.jain - 1.0).abs() < 1e-12);
        assert!(r.max_deviation() < 1e-12);
        let r = FairnessReport::new(&[20.0, 20.0, 0.0], &[1.0, 1.0, 0.0]);
        assert!((r.jain - 1.0).abs() < 1e-12);
        assert_eq!(r.vms[2].ratio, 0.0);
        let r = FairnessReport::new(&[30.0, 10.0], &[1.0, 1.0]);
        assert!((r.max_deviation() - 0.5).abs() < 1e-12);
        assert!(r.jain < 0.9);
        let r = FairnessReport::new(&[0.0], &[0.0]);
        assert_eq!(r.jain, 1.0);
    }

    #[test]
    fn bucket_edges_are_consistent() {
        for v in (0..5000u64).chain([u64::MAX, 1 << 40, (1 << 40) - 1]) {
            let b = bucket(v);
            assert!(bucket_high(b) >= v, "v={v} b={b}");
            if b > 0 {
                assert!(bucket_high(b - 1) < v, "v={v} b={b}");
            }
        }
    }

    #[test]
    fn percentiles() {
        let mut h = LatencyHistogram::new();
        assert_eq!(h.percentile(0.99), 0);
        assert_eq!(h.mean(), 0.0);
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.percentile(0.5) as f64;
        let p99 = h.percentile(0.99) as f64;
        assert!((p50 / 500_000.0 - 1.0).abs() < 0.04, "{p50}");
        assert!((p99 / 990_000.0 - 1.0).abs() < 0.04, "{p99}");
        assert_eq!(h.percentile(1.0), 1_000_000);
        assert_eq!(h.count(), 1000);
        assert_eq!(h.max(), 1_000_000);
        let mut g = LatencyHistogram::new();
        g.record(7);
        g.merge(&h);
        assert_eq!(g.count(), 1001);
        assert_eq!(g.percentile(0.0), 7);
        assert!((h.mean() - 500_500.0).abs() < 1e-6);
    }
}
