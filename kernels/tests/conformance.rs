//! The backend conformance suite on the CPU backend, once per instruction set this CPU has
//! (AVX-512 BF16, AVX-512, portable), against the float64 reference.

use expertmesh_kernels::conformance::Suite;
use expertmesh_kernels::cpu::{CpuBackend, Isa};

#[test]
fn cpu_backend_conforms_on_every_instruction_set() {
    let suite = Suite::new();
    assert!(suite.len() >= 50, "the suite has {} cases", suite.len());
    let isas = Isa::supported();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bf16") {
        assert!(isas.contains(&Isa::Avx512Bf16), "AVX-512 BF16 is present but not used");
    }
    let mut failures = Vec::new();
    for isa in isas {
        let backend = CpuBackend::with_isa(isa).expect("a supported instruction set");
        failures.extend(suite.run(&backend));
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}
