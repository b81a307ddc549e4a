/*
 * The QEMU peer's guest: the testvm hotset workload's twin, booted by QEMU's multiboot loader.
 *
 * QEMU (TCG) enters here in 32-bit protected mode, paging off, EAX = multiboot magic, EBX = the multiboot
 * information. The program:
 *   1. builds identity page tables (2 MiB pages, the first 8 GiB) at 2 MiB, enters 64-bit long mode;
 *   2. installs an IDT: vectors 0-31 report "EXC <vector>" on COM1 and halt; vector 32 is the PIT tick;
 *      anything else reports "INT?" and halts;
 *   3. fills every RAM region of the multiboot memory map above 4 MiB with xorshift64 output
 *      (incompressible, as testvm's --fill);
 *   4. runs the hotset workload: an MMIX LCG picks a page of the hot set (HOT pages from 4 MiB up) and
 *      stores its state at a random qword of that page, one store per page write, exactly as testvm's
 *      guest does; every 8 writes it paces itself to RATE pages/s against the TSC (TSC_HZ ticks/s),
 *      napping with HLT until the next 1 kHz PIT tick when ahead of schedule.
 *
 * Parameters come on the multiboot command line (QEMU's -append): "HOT RATE TSC_HZ [PREFILLED]", decimal;
 * QEMU puts the kernel's path before them, which the parser skips. PREFILLED 1 skips step 3: the host
 * filled RAM before boot (a memory-backend-file on a pre-filled file), which is what runs at host speed
 * under an emulating KVM.
 * The status record is at GPA 0x101000 (STATUS): magic, state (1 filling, 2 running), pages written,
 * fill pages, last TSC. The bench reads it through QEMU's monitor (xp) to measure the guest's own rate.
 */
    .intel_syntax noprefix

    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00000003
    .set STATUS, 0x101000
    .set ST_MAGIC, 0
    .set ST_STATE, 8
    .set ST_PAGES, 16
    .set ST_FILL_PAGES, 24
    .set ST_LAST_TSC, 32
    .set ST_HOT, 40
    .set ST_RATE, 48
    .set ST_TSC_HZ, 56
    .set ST_TICKS, 64
    .set ST_PREFILLED, 72
    .set PML4, 0x200000
    .set PDPT, 0x201000
    .set PD, 0x202000
    .set IDT, 0x20a000
    .set STACK_TOP, 0x300000
    .set WORK_START, 0x400000
    .set COM1, 0x3f8

    .text
    .code32
    .globl mb_entry
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

mb_entry:
    cli
    mov esp, STACK_TOP
    mov esi, ebx                      /* keep the multiboot info (esi survives into long mode) */
    /* zero PML4, PDPT and 8 page directories */
    mov edi, PML4
    mov ecx, (IDT - PML4) / 4
    xor eax, eax
    rep stosd
    mov dword ptr [PML4], PDPT + 3
    /* PDPT[j] = PD + j * 4096 | present, writable, for j < 8 */
    xor ecx, ecx
1:  mov eax, ecx
    shl eax, 12
    add eax, PD + 3
    mov [PDPT + ecx * 8], eax
    inc ecx
    cmp ecx, 8
    jb 1b
    /* PD entries: 4096 x 2 MiB pages, identity; 64-bit physical addresses (high dword = i >> 11) */
    xor ecx, ecx
2:  mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov [PD + ecx * 8], eax
    mov eax, ecx
    shr eax, 11
    mov [PD + ecx * 8 + 4], eax
    inc ecx
    cmp ecx, 4096
    jb 2b
    lgdt [gdt_desc]
    mov eax, cr4
    or eax, 1 << 5                    /* PAE */
    mov cr4, eax
    mov eax, PML4
    mov cr3, eax
    mov ecx, 0xC0000080               /* EFER */
    rdmsr
    or eax, 1 << 8                    /* LME */
    wrmsr
    mov eax, cr0
    or eax, 0x80000001                /* PG | PE */
    mov cr0, eax
    ljmp 0x08, offset long_entry

    .code64
long_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov rsp, STACK_TOP
    mov r15, STATUS
    movabs rax, 0x5445455750454F45    /* "EOEPWEET": status magic */
    mov [r15 + ST_MAGIC], rax
    mov qword ptr [r15 + ST_STATE], 1
    call idt_install
    call pic_pit_init
    call parse_cmdline
    lea rsi, [rip + msg_up]
    call puts
    call fill_ram
    mov qword ptr [r15 + ST_STATE], 2
    lea rsi, [rip + msg_fill]
    call puts
    sti
    jmp workload

/* ---- parameters ------------------------------------------------------------------------------- */
/* esi (zero-extended) = multiboot info; flags bit 2: cmdline at +16 */
parse_cmdline:
    mov r14d, esi                     /* keep mbi for fill_ram */
    mov eax, [r14]
    test eax, 4
    jz 9f
    mov ebx, [r14 + 16]               /* rbx = cmdline: "KERNEL-PATH HOT RATE TSC_HZ" */
    /* skip the kernel's path, which QEMU puts first (and which may hold digits) */
5:  movzx ecx, byte ptr [rbx]
    test ecx, ecx
    jz 6f
    cmp ecx, ' '
    je 6f
    inc rbx
    jmp 5b
6:  call next_number
    mov [r15 + ST_HOT], rax
    call next_number
    mov [r15 + ST_RATE], rax
    call next_number
    mov [r15 + ST_TSC_HZ], rax
    call next_number
    mov [r15 + ST_PREFILLED], rax
9:  cmp qword ptr [r15 + ST_HOT], 0
    jne 8f
    mov qword ptr [r15 + ST_HOT], 1
8:  cmp qword ptr [r15 + ST_TSC_HZ], 0
    jne 7f
    movabs rax, 1000000000
    mov [r15 + ST_TSC_HZ], rax
7:  ret

/* the next decimal number at [rbx], skipping anything else first; rax = value (0 at the end) */
next_number:
    xor eax, eax
1:  movzx ecx, byte ptr [rbx]
    test ecx, ecx
    jz 3f
    sub ecx, '0'
    cmp ecx, 9
    jbe 2f
    inc rbx
    jmp 1b
2:  movzx ecx, byte ptr [rbx]
    sub ecx, '0'
    cmp ecx, 9
    ja 3f
    imul rax, rax, 10
    add rax, rcx
    inc rbx
    jmp 2b
3:  ret

/* ---- fill ---------------------------------------------------------------------------------------- */
/* Every type-1 region of the multiboot memory map (flags bit 6; length at +44, address at +48), from
   WORK_START up, gets xorshift64 output. */
fill_ram:
    cmp qword ptr [r15 + ST_PREFILLED], 0
    jne 9f
    mov eax, [r14]
    test eax, 1 << 6
    jz 9f
    mov ebx, [r14 + 48]               /* rbx = entry */
    mov r13d, [r14 + 44]
    add r13, rbx                      /* r13 = end of the map */
    movabs r12, 0x9E3779B97F4A7C15    /* xorshift state */
1:  cmp rbx, r13
    jae 9f
    cmp dword ptr [rbx + 20], 1
    jne 5f
    mov rdi, [rbx + 4]                /* base */
    mov rdx, [rbx + 12]
    add rdx, rdi                      /* end */
    mov rax, WORK_START
    cmp rdi, rax
    cmovb rdi, rax
    and rdx, -4096
2:  cmp rdi, rdx
    jae 4f
    mov rcx, 512
3:  mov rax, r12
    shl rax, 13
    xor r12, rax
    mov rax, r12
    shr rax, 7
    xor r12, rax
    mov rax, r12
    shl rax, 17
    xor r12, rax
    mov [rdi], r12
    add rdi, 8
    dec rcx
    jnz 3b
    inc qword ptr [r15 + ST_FILL_PAGES]
    jmp 2b
4:
5:  mov eax, [rbx]                    /* entry size, not counting itself */
    lea rbx, [rbx + rax + 4]
    jmp 1b
9:  ret

/* ---- workload ------------------------------------------------------------------------------------ */
/* r12 = LCG state, r10 = hot pages, r8 = pacing base TSC, rsi = pages since the base */
workload:
    movabs r12, 0x2545F4914F6CDD1D
    mov r10, [r15 + ST_HOT]
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r8, rax
    xor esi, esi
1:  test esi, 7
    jz pace
pick:
    movabs rax, 6364136223846793005
    imul r12, rax
    movabs rax, 1442695040888963407
    add r12, rax
    mov rax, r12
    shr rax, 32
    mul r10
    shr rax, 32
    shl rax, 12
    add rax, WORK_START
    mov rdx, r12
    shr rdx, 17
    and rdx, 4088
    mov [rax + rdx], r12
    inc qword ptr [r15 + ST_PAGES]
    inc rsi
    jmp 1b

pace:
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [r15 + ST_LAST_TSC], rax
    mov rcx, [r15 + ST_RATE]
    test rcx, rcx
    jz pick
    /* allowed = (now - base) * rate / tsc_hz */
    sub rax, r8
    mul rcx
    div qword ptr [r15 + ST_TSC_HZ]
    cmp rsi, rax
    jb 2f
    hlt                               /* ahead: nap until the next tick (1 ms) */
    jmp pace
2:  /* behind by more than 20 ms of pages (paused, throttled, migrated): re-base instead of bursting */
    mov rdx, rax
    sub rdx, rsi
    mov rax, rcx
    mov rdi, rdx
    xor edx, edx
    mov ecx, 50
    div rcx
    inc rax
    cmp rdi, rax
    jbe pick
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r8, rax
    xor esi, esi
    jmp pick

/* ---- interrupts ---------------------------------------------------------------------------------- */
idt_install:
    mov rdi, IDT
    xor ecx, ecx
1:  lea rax, [rip + unexpected]
    cmp ecx, 32
    jae 2f
    lea rax, [rip + exc_stubs]
    mov rdx, rcx
    shl rdx, 4
    add rax, rdx
2:  cmp ecx, 32
    jne 3f
    lea rax, [rip + tick]
3:  /* 16-byte interrupt gate: offset 15:0, selector 8, type 0x8E, offset 31:16, offset 63:32 */
    mov [rdi], ax
    mov word ptr [rdi + 2], 0x08
    mov word ptr [rdi + 4], 0x8E00
    shr rax, 16
    mov [rdi + 6], ax
    shr rax, 16
    mov [rdi + 8], eax
    mov dword ptr [rdi + 12], 0
    add rdi, 16
    inc ecx
    cmp ecx, 256
    jb 1b
    lidt [rip + idt_desc]
    ret

/* 8259 PICs remapped to 0x20/0x28, only IRQ0 unmasked; 8254 channel 0 at 1193182 / 1193 = 1000 Hz */
pic_pit_init:
    mov al, 0x11
    out 0x20, al
    out 0xA0, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x28
    out 0xA1, al
    mov al, 4
    out 0x21, al
    mov al, 2
    out 0xA1, al
    mov al, 1
    out 0x21, al
    out 0xA1, al
    mov al, 0xFE
    out 0x21, al
    mov al, 0xFF
    out 0xA1, al
    mov al, 0x34
    out 0x43, al
    mov ax, 1193
    out 0x40, al
    mov al, ah
    out 0x40, al
    ret

tick:
    push rax
    inc qword ptr [STATUS + ST_TICKS]
    mov al, 0x20
    out 0x20, al
    pop rax
    iretq

    .balign 16
exc_stubs:
    .set vec, 0
    .rept 32
    .balign 16
    push vec
    jmp exception
    .set vec, vec + 1
    .endr

exception:
    lea rsi, [rip + msg_exc]
    call puts
    pop rax
    call put_hex
    mov al, '\n'
    call putc
1:  cli
    hlt
    jmp 1b

unexpected:
    lea rsi, [rip + msg_int]
    call puts
1:  cli
    hlt
    jmp 1b

/* ---- COM1 ---------------------------------------------------------------------------------------- */
putc:
    push rdx
    mov dx, COM1
    out dx, al
    pop rdx
    ret

puts:
    mov al, [rsi]
    test al, al
    jz 1f
    call putc
    inc rsi
    jmp puts
1:  ret

/* rax as 16 hex digits */
put_hex:
    mov rcx, 16
    mov rdx, rax
1:  rol rdx, 4
    mov al, dl
    and al, 15
    add al, '0'
    cmp al, '9'
    jbe 2f
    add al, 'a' - '9' - 1
2:  call putc
    dec rcx
    jnz 1b
    ret

msg_up:   .asciz "qemu-guest: long mode, filling\n"
msg_fill: .asciz "qemu-guest: filled, running\n"
msg_exc:  .asciz "EXC "
msg_int:  .asciz "INT? unexpected interrupt\n"

    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff          /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff          /* 0x10: data */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
idt_desc:
    .word 256 * 16 - 1
    .quad IDT

    /* The status record at its fixed address (the image starts at 1 MiB). */
    .org STATUS - 0x100000
status:
    .skip 4096
