/* x86_64.S: the agent's entry, exit and system call stub (the only x86-64 code of the agent).
 *
 * Entry (offset 0 of the blob): pipecr sets rip here, rdi = the control block, rsp = below the
 * rt_sigframe (agent_return below) or the register block it wrote on the thread's stack. In the
 * fallback (no frame) agent_main(ctl) returns the register block's address;
 * the epilogue pops every general register and the flags from it and `ret $128` jumps to the saved rip
 * with rsp back at its saved value (the block ends 128 bytes, the red zone, below it). The agent is
 * built with -mgeneral-regs-only: the FPU/SSE/AVX state is never touched, so nothing of it needs
 * saving. */
        .section .text.entry, "ax"
        .globl  _start
        .type   _start, @function
_start:
        and     $-16, %rsp
        call    agent_main
        mov     %rax, %rsp
        pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %r11
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rdi
        pop     %rsi
        pop     %rbp
        pop     %rbx
        pop     %rdx
        pop     %rcx
        pop     %rax
        popfq
        ret     $128

/* void agent_return(frame, gadget, base, len): the exit when pipecr built an rt_sigframe. Jumps to
 * the target's `syscall; ret` with rax = munmap(base, len) (the agent's own mapping: this code) and
 * rsp = frame: the ret pops the frame's restorer, whose rt_sigreturn puts back every register, the
 * FPU state and the signal mask. Every signal is blocked until then, so no handler can run into the
 * unmapped code. Never returns. */
        .text
        .globl  agent_return
        .hidden agent_return
        .type   agent_return, @function
agent_return:
        mov     %rsi, %r11
        mov     %rdi, %rsp
        mov     %rdx, %rdi
        mov     %rcx, %rsi
        mov     $11, %eax       /* __NR_munmap */
        jmp     *%r11

/* long agent_syscall(long nr, long a1, long a2, long a3, long a4, long a5, long a6) */
        .text
        .globl  agent_syscall
        .hidden agent_syscall
        .type   agent_syscall, @function
agent_syscall:
        mov     %rdi, %rax
        mov     %rsi, %rdi
        mov     %rdx, %rsi
        mov     %rcx, %rdx
        mov     %r8, %r10
        mov     %r9, %r8
        mov     8(%rsp), %r9
        syscall
        ret
        .section .note.GNU-stack, "", @progbits
