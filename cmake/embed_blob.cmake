# embed_blob.cmake: cmake -DIN=blob.bin -DOUT=blob.cpp -DNAME=symbol -P embed_blob.cmake
# Writes a C++ source that defines `extern const unsigned char NAME[]` and `NAME_size` in namespace
# pipecr::sys with the bytes of IN.
file(READ "${IN}" hex HEX)
string(LENGTH "${hex}" n)
math(EXPR size "${n} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
string(REGEX REPLACE "((0x[0-9a-f][0-9a-f],){16})" "\\1\n" bytes "${bytes}")
file(WRITE "${OUT}.tmp" "// Generated from ${IN} by cmake/embed_blob.cmake: do not edit.\n#include <cstddef>\nnamespace pipecr::sys {\nextern const unsigned char ${NAME}[];\nextern const size_t ${NAME}_size;\nalignas(16) const unsigned char ${NAME}[] = {\n${bytes}\n};\nconst size_t ${NAME}_size = ${size};\n}  // namespace pipecr::sys\n")
file(COPY_FILE "${OUT}.tmp" "${OUT}" ONLY_IF_DIFFERENT)
