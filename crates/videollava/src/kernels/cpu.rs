//! The one CPU-feature detection of every kernel, and the switch that forces a lower kernel set.
//!
//! Kernel sets, lowest to highest: [`KernelSet::Portable`] (plain Rust, any CPU and architecture),
//! [`KernelSet::Avx2`] (x86-64 with AVX2 + FMA + F16C: AMD Zen 2/3), [`KernelSet::AvxVnni`] (AVX2
//! plus the 256-bit `vpdpbusd`: Intel since Alder Lake), [`KernelSet::Avx512`] (AVX-512 F/BW/VL on
//! top of AVX2), [`KernelSet::Amx`] (AVX-512 plus Intel AMX tiles with BF16: Sapphire Rapids and
//! later). Within a set, a kernel may need more ([`Features::avx512_bf16`] for `vdpbf16ps`,
//! [`Features::avx512_vnni`] for `vpdpbusd`); where that is missing it takes the next lower path.
//! Each set is its own level so that a machine with the higher one also tests the lower ones.
//!
//! Features are detected once per process. Two switches lower the ceiling:
//! - the environment variable `VIDEOLLAVA_KERNELS` = `portable` | `avx2` | `avx512` | `auto`
//!   (read once; for benchmarks and for running a whole program on a lower path);
//! - [`force`], for the calling thread until its guard drops (tests). Kernels read the set on the
//!   thread that calls them and hand it to their parallel tasks, so a forced set holds for the
//!   whole call.

use std::cell::Cell;
use std::sync::OnceLock;

/// A family of kernels, ordered from the lowest to the highest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelSet {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// [`KernelSet::Avx2`] plus AVX-VNNI (`vpdpbusd` on 256-bit registers).
    AvxVnni,
    /// x86-64 with AVX-512 F, BW and VL (plus AVX2, FMA, F16C).
    Avx512,
    /// [`KernelSet::Avx512`] plus AMX tiles with BF16 (`tdpbf16ps`), the OS permitting their use.
    Amx,
}

impl KernelSet {
    /// Every set, lowest first.
    pub const ALL: [KernelSet; 5] =
        [KernelSet::Portable, KernelSet::Avx2, KernelSet::AvxVnni, KernelSet::Avx512, KernelSet::Amx];

    /// The name `VIDEOLLAVA_KERNELS` and `videollava bench` use.
    pub fn name(self) -> &'static str {
        match self {
            KernelSet::Portable => "portable",
            KernelSet::Avx2 => "avx2",
            KernelSet::AvxVnni => "avxvnni",
            KernelSet::Avx512 => "avx512",
            KernelSet::Amx => "amx",
        }
    }

    fn parse(s: &str) -> Option<Option<KernelSet>> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" | "best" => Some(None),
            "portable" | "scalar" | "generic" => Some(Some(KernelSet::Portable)),
            "avx2" => Some(Some(KernelSet::Avx2)),
            "avxvnni" | "avx-vnni" => Some(Some(KernelSet::AvxVnni)),
            "avx512" | "avx-512" => Some(Some(KernelSet::Avx512)),
            "amx" => Some(Some(KernelSet::Amx)),
            _ => None,
        }
    }
}

impl std::fmt::Display for KernelSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the kernels may use on this thread, now: the detected features capped by the switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// AVX2 + FMA + F16C.
    pub avx2: bool,
    /// AVX-VNNI (`vpdpbusd` on 256-bit registers, Alder Lake and later).
    pub avx_vnni: bool,
    /// AVX-512 F + BW + VL (with AVX2, FMA, F16C).
    pub avx512: bool,
    /// AVX-512 BF16 (`vdpbf16ps`), with [`Self::avx512`].
    pub avx512_bf16: bool,
    /// AVX-512 VNNI (`vpdpbusd`), with [`Self::avx512`].
    pub avx512_vnni: bool,
    /// AMX tiles with BF16 (`tdpbf16ps`), with [`Self::avx512_bf16`]; the process holds the
    /// kernel's permission to use the tile data.
    pub amx_bf16: bool,
}

impl Features {
    /// The highest kernel set these features allow.
    pub fn kernel_set(self) -> KernelSet {
        if self.amx_bf16 {
            KernelSet::Amx
        } else if self.avx512 {
            KernelSet::Avx512
        } else if self.avx_vnni {
            KernelSet::AvxVnni
        } else if self.avx2 {
            KernelSet::Avx2
        } else {
            KernelSet::Portable
        }
    }

    /// These features with everything above `set` removed.
    pub fn capped(self, set: KernelSet) -> Features {
        let mut f = self;
        if set < KernelSet::Amx {
            f.amx_bf16 = false;
        }
        if set < KernelSet::Avx512 {
            f.avx512 = false;
            f.avx512_bf16 = false;
            f.avx512_vnni = false;
        }
        if set < KernelSet::AvxVnni {
            f.avx_vnni = false;
        }
        if set < KernelSet::Avx2 {
            f.avx2 = false;
        }
        f
    }
}

/// The features of this CPU, detected once (no switch applied).
pub fn detected() -> Features {
    static DETECTED: OnceLock<Features> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    use std::arch::is_x86_feature_detected as has;
    let avx2 = has!("avx2") && has!("fma") && has!("f16c");
    let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
    Features {
        avx2,
        avx_vnni: avx2 && has!("avxvnni"),
        avx512,
        avx512_bf16: avx512 && has!("avx512bf16"),
        avx512_vnni: avx512 && has!("avx512vnni"),
        amx_bf16: avx512 && has!("avx512bf16") && amx::usable(),
    }
}

/// Intel AMX: detection and the permission Linux asks for before a process may use the tiles.
#[cfg(target_arch = "x86_64")]
mod amx {
    /// CPUID.(EAX=7,ECX=0):EDX bits of AMX-BF16 and AMX-TILE.
    const AMX_BF16: u32 = 1 << 22;
    const AMX_TILE: u32 = 1 << 24;
    /// XCR0 bits of the tile configuration and tile data state.
    const XTILE: u64 = (1 << 17) | (1 << 18);
    /// `arch_prctl` (syscall 158) request, and the state component it asks for (XTILEDATA).
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;

    /// Whether this CPU has AMX tiles with BF16, the OS saves their state, and this process is
    /// allowed to use them (asked for once, process-wide, here).
    pub(super) fn usable() -> bool {
        use core::arch::x86_64::{__cpuid, __cpuid_count};
        // Leaf 7 is read only when the maximum leaf (leaf 0's EAX) allows it.
        if __cpuid(0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        if edx & (AMX_BF16 | AMX_TILE) != AMX_BF16 | AMX_TILE || !std::is_x86_feature_detected!("xsave") {
            return false;
        }
        // SAFETY: `xgetbv` with ECX=0 exists where XSAVE is enabled by the OS (OSXSAVE, which
        // `is_x86_feature_detected!("xsave")` implies).
        let xcr0 = unsafe { xcr0() };
        if xcr0 & XTILE != XTILE {
            return false;
        }
        request_permission()
    }

    /// `XGETBV(0)`.
    ///
    /// # Safety
    /// The OS has enabled XSAVE (CPUID.1:ECX.OSXSAVE).
    #[target_feature(enable = "xsave")]
    unsafe fn xcr0() -> u64 {
        // SAFETY: the caller's contract.
        unsafe { core::arch::x86_64::_xgetbv(0) }
    }

    #[cfg(target_os = "linux")]
    fn request_permission() -> bool {
        let ret: i64;
        // SAFETY: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` only changes which
        // register state this process may use; the syscall clobbers rcx and r11, declared here.
        unsafe {
            core::arch::asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }

    /// Other systems: not used (their permission model is not handled here).
    #[cfg(not(target_os = "linux"))]
    fn request_permission() -> bool {
        false
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Features {
    Features::default()
}

/// The ceiling set by `VIDEOLLAVA_KERNELS`, read once (`None`: no ceiling).
fn env_ceiling() -> Option<KernelSet> {
    static CEILING: OnceLock<Option<KernelSet>> = OnceLock::new();
    *CEILING.get_or_init(|| {
        let value = std::env::var("VIDEOLLAVA_KERNELS").ok()?;
        match KernelSet::parse(&value) {
            Some(set) => set,
            None => {
                eprintln!(
                    "warning: VIDEOLLAVA_KERNELS={value:?} is not portable, avx2, avxvnni, avx512, amx or auto; ignored"
                );
                None
            }
        }
    })
}

thread_local! {
    static FORCED: Cell<Option<KernelSet>> = const { Cell::new(None) };
}

/// What the kernels may use on the calling thread now.
pub fn features() -> Features {
    let mut f = detected();
    if let Some(set) = env_ceiling() {
        f = f.capped(set);
    }
    if let Some(set) = FORCED.with(Cell::get) {
        f = f.capped(set);
    }
    f
}

/// The highest kernel set allowed on the calling thread now.
pub fn kernel_set() -> KernelSet {
    features().kernel_set()
}

/// The kernel sets this CPU can run (lowest first): the sets a test should force in turn.
pub fn available_sets() -> Vec<KernelSet> {
    let top = detected().kernel_set();
    KernelSet::ALL.into_iter().filter(|&s| s <= top).collect()
}

/// Restores the previous ceiling of its thread when dropped.
#[must_use = "the kernel set is forced only while the guard lives"]
pub struct ForceGuard {
    previous: Option<KernelSet>,
}

impl Drop for ForceGuard {
    fn drop(&mut self) {
        FORCED.with(|c| c.set(self.previous));
    }
}

/// Caps the kernels called from this thread at `set` until the guard drops (a set above what the
/// CPU has changes nothing).
pub fn force(set: KernelSet) -> ForceGuard {
    let previous = FORCED.with(|c| c.replace(Some(set)));
    ForceGuard { previous }
}

/// Runs `f` once with each kernel set this CPU has forced in turn, lowest first; `f` receives the
/// set. The shared harness of the kernel tests.
pub fn for_each_set(mut f: impl FnMut(KernelSet)) {
    for set in available_sets() {
        let _guard = force(set);
        f(set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forcing_caps_the_features_and_restores_them() {
        let top = detected().kernel_set();
        assert_eq!(kernel_set(), top.min(env_ceiling().unwrap_or(KernelSet::Amx)));
        {
            let _g = force(KernelSet::Portable);
            assert_eq!(kernel_set(), KernelSet::Portable);
            assert_eq!(features(), Features::default());
            {
                let _h = force(KernelSet::Avx2);
                assert_eq!(kernel_set(), top.min(KernelSet::Avx2).min(env_ceiling().unwrap_or(KernelSet::Amx)));
                assert!(!features().avx512_bf16 && !features().avx512_vnni);
            }
            assert_eq!(kernel_set(), KernelSet::Portable);
        }
        assert_eq!(kernel_set(), top.min(env_ceiling().unwrap_or(KernelSet::Amx)));
        // Another thread is not affected.
        let _g = force(KernelSet::Portable);
        let other = std::thread::spawn(|| FORCED.with(Cell::get)).join().unwrap();
        assert_eq!(other, None);
    }

    #[test]
    fn names_parse_back() {
        for s in KernelSet::ALL {
            assert_eq!(KernelSet::parse(s.name()), Some(Some(s)));
        }
        assert_eq!(KernelSet::parse("auto"), Some(None));
        assert_eq!(KernelSet::parse("sse9"), None);
        assert_eq!(available_sets()[0], KernelSet::Portable);
    }
}
