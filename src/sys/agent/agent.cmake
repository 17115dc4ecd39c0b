# agent.cmake: builds the in-target agent (agent.c + the arch file) as one freestanding,
# position-independent block with the project's C compiler, extracts it with objcopy and embeds it
# into pipecr_sys as pipecr::sys::agent_blob (src/sys/agent.cpp maps it into targets).
# No sanitizer or libc: the agent runs inside another process, on that process's stack.
set(_agent_dir ${CMAKE_CURRENT_SOURCE_DIR}/src/sys/agent)
set(_agent_out ${CMAKE_CURRENT_BINARY_DIR}/agent)
file(MAKE_DIRECTORY ${_agent_out})
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64")
  set(_agent_arch x86_64)
else()
  message(FATAL_ERROR "pipecr's agent has no arch file for ${CMAKE_SYSTEM_PROCESSOR}")
endif()
find_program(PIPECR_OBJCOPY NAMES objcopy llvm-objcopy REQUIRED)
set(_agent_cflags -O2 -std=c11 -Wall -Wextra -Werror -ffreestanding -fPIE -fno-stack-protector
    -mgeneral-regs-only -fno-asynchronous-unwind-tables -fno-unwind-tables -fcf-protection=none
    -fno-builtin -fno-jump-tables -fvisibility=hidden -nostdlib)
add_custom_command(
  OUTPUT ${_agent_out}/agent.bin
  COMMAND ${CMAKE_C_COMPILER} ${_agent_cflags} -c ${_agent_dir}/agent.c -o ${_agent_out}/agent.o
  COMMAND ${CMAKE_C_COMPILER} -c ${_agent_dir}/${_agent_arch}.S -o ${_agent_out}/entry.o
  COMMAND ${CMAKE_C_COMPILER} -nostdlib -static -Wl,--build-id=none -Wl,-T,${_agent_dir}/agent.ld
          -o ${_agent_out}/agent.elf ${_agent_out}/entry.o ${_agent_out}/agent.o
  COMMAND ${PIPECR_OBJCOPY} -O binary -j .text ${_agent_out}/agent.elf ${_agent_out}/agent.bin
  DEPENDS ${_agent_dir}/agent.c ${_agent_dir}/agent_abi.h ${_agent_dir}/${_agent_arch}.S ${_agent_dir}/agent.ld
  COMMENT "Building the in-target agent"
  VERBATIM)
add_custom_command(
  OUTPUT ${_agent_out}/agent_blob.cpp
  COMMAND ${CMAKE_COMMAND} -DIN=${_agent_out}/agent.bin -DOUT=${_agent_out}/agent_blob.cpp -DNAME=agent_blob
          -P ${CMAKE_CURRENT_SOURCE_DIR}/cmake/embed_blob.cmake
  DEPENDS ${_agent_out}/agent.bin ${CMAKE_CURRENT_SOURCE_DIR}/cmake/embed_blob.cmake
  VERBATIM)
target_sources(pipecr_sys_obj PRIVATE ${_agent_out}/agent_blob.cpp
               ${CMAKE_CURRENT_SOURCE_DIR}/src/sys/arch/${_agent_arch}.cpp)
