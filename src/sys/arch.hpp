// arch.hpp: the architecture file of this build (registers, syscall instruction, restart codes, the
// agent's return paths). Everything architecture-specific of src/sys lives in sys/arch/<arch>.*;
// another architecture is one more pair of files there and one more line here.
#pragma once

#if defined(__x86_64__)
#include "sys/arch/x86_64.hpp"
#else
#error "pipecr has no arch file for this architecture (src/sys/arch/)"
#endif
