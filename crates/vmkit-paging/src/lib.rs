//! x86 paging for VMMs: page-table walkers with exact permission and fault semantics, EPT, nested walks, a page-table builder, a software TLB and a shadow MMU.
