"""cffi API-mode build of the /dev/kvm bindings.

Struct layouts and ioctl numbers come from the system's <linux/kvm.h> at build
time (``...`` lets the C compiler fill in offsets and sizes), so nothing here
hard-codes an ABI detail.
"""

from cffi import FFI

IOCTLS = """
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST
KVM_CREATE_VCPU KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR
KVM_CREATE_IRQCHIP KVM_CREATE_PIT2 KVM_IRQ_LINE KVM_IRQFD KVM_IOEVENTFD
KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_GET_PIT2 KVM_SET_PIT2 KVM_GET_CLOCK KVM_SET_CLOCK
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
KVM_SET_CPUID2 KVM_GET_CPUID2 KVM_GET_MSRS KVM_SET_MSRS KVM_GET_LAPIC KVM_SET_LAPIC
KVM_GET_XSAVE KVM_SET_XSAVE KVM_GET_XCRS KVM_SET_XCRS KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS
KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS KVM_GET_TSC_KHZ
KVM_KVMCLOCK_CTRL
""".split()

CONSTANTS = """
KVM_API_VERSION
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG KVM_EXIT_HLT
KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR
KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_CAP_IRQCHIP KVM_CAP_PIT2 KVM_CAP_IRQFD KVM_CAP_IOEVENTFD KVM_CAP_USER_MEMORY
KVM_CAP_SET_TSS_ADDR KVM_CAP_EXT_CPUID KVM_CAP_MP_STATE KVM_CAP_XSAVE KVM_CAP_XCRS
KVM_CAP_VCPU_EVENTS KVM_CAP_DEBUGREGS KVM_CAP_ADJUST_CLOCK KVM_CAP_IMMEDIATE_EXIT
KVM_CAP_NR_VCPUS KVM_CAP_MAX_VCPUS KVM_CAP_PIT_STATE2 KVM_CAP_READONLY_MEM KVM_CAP_TSC_DEADLINE_TIMER
KVM_PIT_SPEAKER_DUMMY KVM_IRQCHIP_PIC_MASTER KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC
KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO KVM_IOEVENTFD_FLAG_DEASSIGN KVM_IRQFD_FLAG_DEASSIGN
KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED KVM_MEM_READONLY
KVM_CLOCK_TSC_STABLE
""".split()

CDEF = "\n".join(f"#define {name} ..." for name in IOCTLS + CONSTANTS) + r"""
int ioctl(int fd, unsigned long request, ...);

struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags; uint64_t guest_phys_addr; uint64_t memory_size;
    uint64_t userspace_addr;
};
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector; uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl; uint8_t unusable; ...;
};
struct kvm_dtable { uint64_t base; uint16_t limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss; struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8; uint64_t efer; uint64_t apic_base; ...;
};
struct kvm_fpu { uint16_t fcw; uint32_t mxcsr; ...; };
struct kvm_cpuid_entry2 {
    uint32_t function; uint32_t index; uint32_t flags;
    uint32_t eax; uint32_t ebx; uint32_t ecx; uint32_t edx; ...;
};
struct kvm_cpuid2 { uint32_t nent; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_msr_entry { uint32_t index; uint64_t data; ...; };
struct kvm_msrs { uint32_t nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; };
struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_irq_level { uint32_t irq; uint32_t level; ...; };
struct kvm_irqfd { uint32_t fd; uint32_t gsi; uint32_t flags; ...; };
struct kvm_ioeventfd { uint64_t datamatch; uint64_t addr; uint32_t len; int32_t fd; uint32_t flags; ...; };
struct kvm_lapic_state { char regs[...]; };
struct kvm_xsave { ...; };
struct kvm_xcrs { ...; };
struct kvm_vcpu_events { ...; };
struct kvm_debugregs { ...; };
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_irqchip { uint32_t chip_id; ...; };
struct kvm_pit_state2 { ...; };
struct kvm_clock_data { uint64_t clock; uint32_t flags; ...; };

struct kvm_run {
    uint8_t request_interrupt_window; uint8_t immediate_exit;
    uint32_t exit_reason; uint8_t ready_for_interrupt_injection; uint8_t if_flag;
    ...;
};
struct sv_exit_io { uint8_t direction; uint8_t size; uint16_t port; uint32_t count; uint64_t data_offset; };
struct sv_exit_mmio { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; };
struct sv_exit_system_event { uint32_t type; uint32_t ndata; uint64_t data[16]; };
struct sv_exit_internal { uint32_t suberror; uint32_t ndata; uint64_t data[16]; };
struct sv_exit_fail_entry { uint64_t hardware_entry_failure_reason; uint32_t cpu; };
static const unsigned long SV_RUN_EXIT_OFFSET;
"""

SOURCE = r"""
#include <sys/ioctl.h>
#include <stddef.h>
#include <linux/kvm.h>
/* Views of kvm_run's exit union; their layouts mirror the anonymous structs there. */
struct sv_exit_io { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; };
struct sv_exit_mmio { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; };
struct sv_exit_system_event { __u32 type; __u32 ndata; __u64 data[16]; };
struct sv_exit_internal { __u32 suberror; __u32 ndata; __u64 data[16]; };
struct sv_exit_fail_entry { __u64 hardware_entry_failure_reason; __u32 cpu; };
static const unsigned long SV_RUN_EXIT_OFFSET = offsetof(struct kvm_run, io);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("stratovirt_py.kvm._kvm_cffi", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
