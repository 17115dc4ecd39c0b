# Packaging.cmake: Debian packages from the install rules, with `cpack -G DEB` in a build tree.
#
#   pipecr         the command, pipecr(1), bash and zsh completion      (component cli)
#   libpipecr0     libpipecr.so.0                                         (component lib)
#   libpipecr-dev  headers, libpipecr.so, CMake package, pipecr.pc, libpipecr(3)  (component dev)
#
# CPack rather than a debian/ directory: the packages are cut from the same install rules that
# `cmake --install` uses (one list of files, tested by tests/consumer and tests/package), and need
# nothing beyond CMake and dpkg-dev; a debian/ directory would repeat that list in debhelper's
# terms and add debhelper to the build dependencies. Dependencies on system libraries come from
# dpkg-shlibdeps; libpipecr0 ships a shlibs file so that programs linking it get a versioned
# dependency on it in turn. Files are installed below /usr whatever CMAKE_INSTALL_PREFIX says.
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME pipecr)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_CONTACT "pipecr maintainers <pipecr@invalid>")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_STRIP_FILES ON)
set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_COMPONENTS_ALL cli lib dev)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)  # NAME_VERSION_ARCH.deb, as Debian names them
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_ENABLE_COMPONENT_DEPENDS ON)
set(CPACK_DEBIAN_PACKAGE_RELEASE 1)
# Each description's first line is its package's summary (no CPACK_PACKAGE_DESCRIPTION_SUMMARY: CPackDeb
# would put that one above every component's).

set(CPACK_DEBIAN_CLI_PACKAGE_NAME pipecr)
set(CPACK_DEBIAN_CLI_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_CLI_DESCRIPTION "checkpoint, restore and inspect Linux pipes and FIFOs\npipecr records the bytes queued in live pipes, their capacity and layout, and which processes\nhold each end, into an image, and puts them back into running processes or a new command.\nIt also shows why a pipeline is stuck: fill levels, blocked readers and writers, live rates.")
# The command links the engine statically: it depends on system libraries only (shlibdeps).

set(CPACK_DEBIAN_LIB_PACKAGE_NAME libpipecr0)
set(CPACK_DEBIAN_LIB_PACKAGE_SECTION libs)
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS ON)  # for the packages holding a shared library: libpipecr0
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS_POLICY ">=")
set(CPACK_DEBIAN_LIB_DESCRIPTION "checkpoint and restore Linux pipes - shared library\nlibpipecr checkpoints a pipe of the calling process into a checksummed image and restores it.")

set(CPACK_DEBIAN_DEV_PACKAGE_NAME libpipecr-dev)
set(CPACK_DEBIAN_DEV_PACKAGE_SECTION libdevel)
set(CPACK_DEBIAN_DEV_PACKAGE_ARCHITECTURE_INDEPENDENT OFF)
# The C++ headers use tl::expected, and pipecrConfig.cmake finds it (find_dependency(tl-expected)).
set(CPACK_DEBIAN_DEV_PACKAGE_DEPENDS "libexpected-dev")
set(CPACK_COMPONENT_DEV_DEPENDS lib)
set(CPACK_DEBIAN_DEV_DESCRIPTION "checkpoint and restore Linux pipes - development files\nHeaders (C and C++), the CMake package pipecr::pipecr, pipecr.pc and libpipecr(3).")

include(CPack)
