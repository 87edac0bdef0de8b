/*
 * PVH entry, static page tables and ring-0 interrupt stubs.
 *
 * Everything here runs in ring 0, where the target host emulates each
 * instruction, so the paths are kept as short as possible: the page tables
 * are pre-built by the assembler instead of being filled in at boot.
 */
#include "guest.h"

#define CR0_PG    (1 << 31)
#define CR4_PAE   (1 << 5)
#define MSR_EFER  0xc0000080
#define EFER_LME  (1 << 8)

/* Page-table entry bits. */
#define PTE_P     0x001
#define PTE_W     0x002
#define PTE_U     0x004   /* needed at every level for ring-3 access */
#define PTE_PWT   0x008
#define PTE_PCD   0x010
#define PTE_PS    0x080   /* 2 MiB page in a PD entry */

/*
 * PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18) tells the loader (linux-loader,
 * QEMU) where the 32-bit, paging-off entry point is. The linker script puts
 * this section in a PT_NOTE program header.
 */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 8                 /* descsz */
    .long 18                /* type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_entry         /* loaders read the low 32 bits */
    .balign 4

/*
 * 32-bit protected mode, paging off, flat segments, ebx = hvm_start_info.
 * Switch to long mode and jump to 64-bit code.
 */
    .section .text.boot, "ax"
    .code32
    .globl pvh_entry
pvh_entry:
    movl %ebx, boot_info_paddr  /* high half of the u64 is already 0 */
    lgdt gdt_desc               /* 32-bit lgdt reads a 32-bit base: fine, we are below 4 GiB */

    movl %cr4, %eax
    orl $CR4_PAE, %eax          /* long mode requires PAE paging */
    movl %eax, %cr4

    movl $pml4, %eax
    movl %eax, %cr3

    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr

    movl %cr0, %eax
    orl $CR0_PG, %eax           /* PG with EFER.LME set activates long mode */
    movl %eax, %cr0

    ljmp $KERNEL_CS, $long_mode_entry   /* load a 64-bit CS */

    .code64
long_mode_entry:
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    leaq kstack_top(%rip), %rsp
    call kernel_main            /* does not return */
1:  hlt
    jmp 1b

    .text
/*
 * enter_user(rip, rsp): iretq into ring 3 with interrupts enabled.
 * SS must be the DPL-3 data selector with RPL 3: the CPL is taken from
 * SS.DPL, so a DPL-0 SS would keep running (emulated) at CPL 0.
 */
    .globl enter_user
enter_user:
    movl $USER_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    pushq $USER_DS              /* ss */
    pushq %rsi                  /* rsp */
    pushq $0x202                /* rflags: IF=1, IOPL=0 (port I/O via TSS bitmap) */
    pushq $USER_CS              /* cs */
    pushq %rdi                  /* rip */
    iretq

/* LAPIC timer: count the tick and acknowledge it. */
    .globl timer_isr
timer_isr:
    incq timer_ticks(%rip)
    pushq %rax
    movabsq $(LAPIC_BASE + LAPIC_EOI), %rax
    movl $0, (%rax)
    popq %rax
    iretq

/* LAPIC spurious interrupts need no EOI. */
    .globl spurious_isr
spurious_isr:
    iretq

/*
 * #UD. On the target host KVM does not deliver `int n` executed in ring 3:
 * it injects #UD at the instruction instead. Treat `int $0x80` (bytes cd 80)
 * coming from ring 3 like the real gate would, resuming after it; anything
 * else is reported as exception 6.
 */
    .globl ud_isr
ud_isr:
    testb $3, 8(%rsp)           /* frame: rip, cs, rflags, rsp, ss */
    jz 1f
    pushq %rbx
    movq 8(%rsp), %rbx
    cmpw $(0x00cd | SYSCALL_VECTOR << 8), (%rbx)
    popq %rbx
    jne 1f
    addq $2, (%rsp)
    jmp syscall_isr
1:  pushq $0
    pushq $6
    jmp exception_common

/* int $0x80 from ring 3: eax = request (SYS_*). */
    .globl syscall_isr
syscall_isr:
    cmpl $SYS_HALT, %eax
    je 1f
    cmpl $SYS_NULL_IDT, %eax
    je 2f
    movl $EXIT_BAD_SYSCALL, %eax
    outl %eax, $DEBUG_EXIT_PORT
1:  cli
    /* Stop the LAPIC timer too: its expiries would wake the halted vCPU every millisecond. */
    movabsq $(LAPIC_BASE + LAPIC_TIMER_ICR), %rax
    movl $0, (%rax)
3:  hlt
    jmp 3b
2:  lidt null_idt_desc(%rip)    /* any later interrupt or exception triple-faults */
    iretq

/*
 * CPU exceptions 0-31: one 16-byte stub per vector (kernel.c computes
 * exception_stubs + 16 * vector). Each pushes a dummy error code where the
 * CPU pushes none, then the vector, and calls exception_report(frame).
 */
    .balign 16
    .globl exception_stubs
exception_stubs:
    .set vec, 0
    .rept 32
    .balign 16
    /* Vectors 8, 10-14, 17, 21, 29, 30 push an error code. */
    .if (vec != 8) && (vec < 10 || vec > 14) && (vec != 17) && (vec != 21) && (vec != 29) && (vec != 30)
    pushq $0
    .endif
    pushq $vec
    jmp exception_common
    .set vec, vec + 1
    .endr

exception_common:
    cld
    movq %rsp, %rdi             /* struct exception_frame * */
    andq $-16, %rsp
    call exception_report       /* does not return */

    .section .rodata
    .balign 8
null_idt_desc:
    .word 0
    .quad 0

/*
 * Identity map of the first 4 GiB with 2 MiB pages. The loader copies these
 * tables from the ELF file, so building them costs no guest instructions.
 */
    .section .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + (PTE_P | PTE_W | PTE_U)
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0000 + (PTE_P | PTE_W | PTE_U)
    .quad pd + 0x1000 + (PTE_P | PTE_W | PTE_U)
    .quad pd + 0x2000 + (PTE_P | PTE_W | PTE_U)
    .quad pd + 0x3000 + (PTE_P | PTE_W | PTE_U)
    .fill 508, 8, 0
pd:
    .set addr, 0
    .rept 2048
    /*
     * Uncached from 3 GiB up: the 32-bit MMIO hole (RAM stops below it) with
     * the virtio-mmio windows (0xd0000000 in forkvm, 0xfeb00000 in QEMU
     * microvm), IOAPIC (0xfec00000) and LAPIC (0xfee00000).
     */
    .if addr >= 0xc0000000
    .quad addr + (PTE_P | PTE_W | PTE_U | PTE_PS | PTE_PCD | PTE_PWT)
    .else
    .quad addr + (PTE_P | PTE_W | PTE_U | PTE_PS)
    .endif
    .set addr, addr + 0x200000
    .endr

/* Stacks need no initial contents: keep them out of the file (NOLOAD). */
    .section .stack, "aw", @nobits
    .balign 16
    .space 16384
    .globl kstack_top
kstack_top:
    .space 65536
    .globl ustack_top
ustack_top:

    .section .note.GNU-stack, "", @progbits
