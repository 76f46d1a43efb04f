# pipewright as a library other programs build on: what `cmake --install
# build --prefix P` puts into P (docs/building.md, "Using pipewright from
# your own program"):
#
#   include/pipewright/pipewright.h, runtime/ graph/ scheduler/ stages/
#                                   the public headers, one include root (-I P/include)
#   lib/libpipewright.so.0.1.0      soname libpipewright.so.0; exports pw_* only
#   lib/libpipewright.a             the same objects, for static links
#   lib/pkgconfig/pipewright.pc     pkg-config (--static adds Requires.private, Libs.private)
#   lib/cmake/pipewright/           find_package(pipewright CONFIG): pipewright::pipewright
#                                   (shared), pipewright::pipewright_static
#
# and, with PW_CUDA=ON, the install COMPONENT cuda: libpipewright_cuda.so.0 /
# libpipewright_cuda.a, pipewright-cuda.pc, include/pipewright/stages/ops/cuda/,
# and find_package(pipewright CONFIG COMPONENTS cuda): pipewright::cuda,
# pipewright::cuda_static.
#
# The module libraries (pw_runtime, pw_graph, pw_scheduler, pw_stages,
# pw_cuda) stay the build's own targets: the tools and tests link them as
# before. Both libpipewright files are made of their objects, compiled once.
# Included at the end of CMakeLists.txt, once those targets exist.

include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

# ---------------------------------------------------------------- public headers
# What a program may include: the umbrella header and everything it includes,
# the backend table (stages/ops/backend.h: choosing and registering backends) and
# the CPU reference kernels (stages/ops/cpu/ops.h: pw_cpu_set_threads, and the
# kernels the CUDA ones are checked against). Every other header is internal
# and is not installed: *-internal.h, *_int.h, runtime/pool.h (the CPU thread
# team), runtime/tmpfile.h (the atomic writes' registry), stages/ops/cpu/gemm.h.
set(PW_PUBLIC_HEADERS
  pipewright.h
  runtime/status.h runtime/log.h runtime/tensor.h runtime/rng.h runtime/arena.h
  runtime/safetensors.h runtime/topology.h runtime/trace.h runtime/trace_read.h runtime/metrics_log.h
  scheduler/analysis/trace_analysis.h runtime/atomic.h runtime/collective.h runtime/compress.h runtime/transport.h runtime/link.h
  graph/graph.h graph/partition.h
  scheduler/stage.h scheduler/schedule.h scheduler/simulate.h scheduler/engine.h scheduler/runner.h
  stages/ops/optim.h stages/train/data.h stages/program/program.h stages/train/program_stage.h stages/train/checkpoint.h stages/train/trainer.h
  stages/train/pipeline.h stages/train/pipeline_metrics.h stages/train/state.h stages/plan/forecast.h stages/plan/profile.h stages/plan/plan.h stages/plan/layout.h stages/train/generate.h
  stages/train/rebalance.h stages/plan/rebalancer.h stages/train/ps.h
  stages/ops/backend.h stages/ops/cpu/ops.h stages/ops/tp.h)
# The CUDA backend's, installed with COMPONENT cuda (C headers: no CUDA header needed).
set(PW_CUDA_PUBLIC_HEADERS stages/ops/cuda/backend_cuda.h stages/ops/cuda/device.h stages/ops/cuda/ops.h)

# The headers name each other from the source root ("runtime/status.h"), which
# the build's -I finds. Installed under include/pipewright/ they are found
# from -I P/include, so each public header is copied into the build's
# include/pipewright/ with every quoted #include made relative to the
# header's own directory ("../runtime/status.h"): the compiler looks there
# first, whatever else is on the include path. Nothing else changes, and a
# public header that includes a header not listed above fails the build
# (cmake/public_header.cmake). The sources keep the one spelling everybody
# writes.
set(PW_INCLUDE_DIR ${CMAKE_CURRENT_BINARY_DIR}/include)
set(_pw_installed_headers ${PW_PUBLIC_HEADERS})
if(PW_CUDA)
  list(APPEND _pw_installed_headers ${PW_CUDA_PUBLIC_HEADERS})
endif()
# For cmake/public_header.cmake and scripts/check-install.sh: the headers
# installed, and every other header of the library's directories (written
# only when they change, so a reconfigure regenerates nothing).
file(GLOB_RECURSE _pw_all_headers RELATIVE ${CMAKE_CURRENT_SOURCE_DIR} CONFIGURE_DEPENDS
     ${CMAKE_CURRENT_SOURCE_DIR}/runtime/*.h ${CMAKE_CURRENT_SOURCE_DIR}/graph/*.h
     ${CMAKE_CURRENT_SOURCE_DIR}/scheduler/*.h ${CMAKE_CURRENT_SOURCE_DIR}/stages/*.h)
set(_pw_internal_headers ${_pw_all_headers})
list(REMOVE_ITEM _pw_internal_headers ${PW_PUBLIC_HEADERS} ${PW_CUDA_PUBLIC_HEADERS})
list(JOIN _pw_installed_headers "\n" _pw_text)
file(CONFIGURE OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/pipewright-public-headers.txt CONTENT "${_pw_text}\n")
list(JOIN _pw_internal_headers "\n" _pw_text)
file(CONFIGURE OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/pipewright-internal-headers.txt CONTENT "${_pw_text}\n")

set(_pw_generated "")
foreach(h ${_pw_installed_headers})
  add_custom_command(OUTPUT ${PW_INCLUDE_DIR}/pipewright/${h}
    COMMAND ${CMAKE_COMMAND} -DIN=${CMAKE_CURRENT_SOURCE_DIR}/${h} -DNAME=${h}
            -DOUT=${PW_INCLUDE_DIR}/pipewright/${h}
            -DLIST=${CMAKE_CURRENT_BINARY_DIR}/pipewright-public-headers.txt
            -P ${CMAKE_CURRENT_SOURCE_DIR}/cmake/public_header.cmake
    DEPENDS ${h} cmake/public_header.cmake ${CMAKE_CURRENT_BINARY_DIR}/pipewright-public-headers.txt
    COMMENT "public header pipewright/${h}" VERBATIM)
  list(APPEND _pw_generated ${PW_INCLUDE_DIR}/pipewright/${h})
endforeach()
add_custom_target(pw_public_headers ALL DEPENDS ${_pw_generated})

function(pw_install_headers component)
  foreach(h ${ARGN})
    get_filename_component(dir ${h} DIRECTORY)
    install(FILES ${PW_INCLUDE_DIR}/pipewright/${h}
            DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/pipewright/${dir} COMPONENT ${component})
  endforeach()
endfunction()

# ---------------------------------------------------------------- libraries
# The module libraries' objects go into libpipewright.so, so they are
# position-independent. -fno-semantic-interposition lets the compiler inline
# and call directly within the library as it did before -fPIC (interposing
# pipewright's own functions is not supported). The tools link the same
# objects through the module libraries, so they run the same code.
set(_pw_modules pw_runtime pw_graph pw_scheduler pw_stages)
set_target_properties(${_pw_modules} PROPERTIES POSITION_INDEPENDENT_CODE ON)
foreach(m ${_pw_modules})
  target_compile_options(${m} PRIVATE -fno-semantic-interposition)
endforeach()

# Only pw_* leaves the shared libraries (the linker script makes every other
# global symbol local). Every symbol must resolve when the library is linked
# (--no-undefined), except in sanitizer and fuzz builds, where clang leaves
# its runtime to the executable.
set(_pw_map ${CMAKE_CURRENT_SOURCE_DIR}/cmake/pipewright.map)
function(pw_shared_library tgt)
  set_target_properties(${tgt} PROPERTIES
    VERSION ${PROJECT_VERSION} SOVERSION ${PROJECT_VERSION_MAJOR}
    LINKER_LANGUAGE C LINK_DEPENDS ${_pw_map})
  target_link_options(${tgt} PRIVATE "LINKER:--version-script=${_pw_map}")
  if(NOT PW_SANITIZE AND NOT PW_FUZZ)
    target_link_options(${tgt} PRIVATE "LINKER:--no-undefined")
  endif()
endfunction()

set(_pw_objects $<TARGET_OBJECTS:pw_runtime> $<TARGET_OBJECTS:pw_graph>
                $<TARGET_OBJECTS:pw_scheduler> $<TARGET_OBJECTS:pw_stages>)
add_library(pipewright_shared SHARED ${_pw_objects})
add_library(pipewright_static STATIC ${_pw_objects})
add_library(pipewright::pipewright ALIAS pipewright_shared)
add_library(pipewright::pipewright_static ALIAS pipewright_static)
pw_shared_library(pipewright_shared)
set_target_properties(pipewright_shared PROPERTIES OUTPUT_NAME pipewright EXPORT_NAME pipewright)
set_target_properties(pipewright_static PROPERTIES OUTPUT_NAME pipewright EXPORT_NAME pipewright_static
                      LINKER_LANGUAGE C)
foreach(tgt pipewright_shared pipewright_static)
  add_dependencies(${tgt} pw_public_headers)
  target_include_directories(${tgt} INTERFACE
    $<BUILD_INTERFACE:${PW_INCLUDE_DIR}> $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
  # Link with what the module libraries link (hwloc, libevent, ...; MPI when
  # built with it): their archives add no code, every pw_ symbol is already
  # in the objects. In the build tree only: the installed package finds the
  # same dependencies itself (cmake/pipewrightConfig.cmake.in).
  target_link_libraries(${tgt} PRIVATE $<BUILD_INTERFACE:pw_stages>)
endforeach()
# hwloc is part of the API (runtime/topology.h takes and returns hwloc objects).
target_link_libraries(pipewright_shared INTERFACE $<BUILD_INTERFACE:PkgConfig::HWLOC>)

install(TARGETS pipewright_shared pipewright_static EXPORT pipewrightTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
pw_install_headers(Unspecified ${PW_PUBLIC_HEADERS})

# ---------------------------------------------------------------- CUDA component
# libpipewright_cuda: pw_cuda's objects (the ops, the device layer, the
# backend's table) over libpipewright. Its link names what those objects
# call directly (CUDA's libraries; libevent, for the device layer's
# completions), never pw_cuda's own link interface: that would copy the
# module archives into it, and with them a second set of pipewright's globals.
if(PW_CUDA)
  set_target_properties(pw_cuda PROPERTIES POSITION_INDEPENDENT_CODE ON)
  set(_pw_cuda_deps CUDA::cudart CUDA::cublas CUDA::cublasLt $<BUILD_INTERFACE:PkgConfig::EVENT>)
  if(PW_NCCL_INCLUDE_DIR AND PW_NCCL_LIBRARY)
    list(APPEND _pw_cuda_deps ${PW_NCCL_LIBRARY})
  endif()
  add_library(pipewright_cuda_shared SHARED $<TARGET_OBJECTS:pw_cuda>)
  add_library(pipewright_cuda_static STATIC $<TARGET_OBJECTS:pw_cuda>)
  add_library(pipewright::cuda ALIAS pipewright_cuda_shared)
  add_library(pipewright::cuda_static ALIAS pipewright_cuda_static)
  pw_shared_library(pipewright_cuda_shared)
  set_target_properties(pipewright_cuda_shared PROPERTIES OUTPUT_NAME pipewright_cuda EXPORT_NAME cuda)
  set_target_properties(pipewright_cuda_static PROPERTIES OUTPUT_NAME pipewright_cuda EXPORT_NAME cuda_static
                        LINKER_LANGUAGE C)
  target_link_libraries(pipewright_cuda_shared PUBLIC pipewright_shared PRIVATE ${_pw_cuda_deps})
  # ops.cu's host code is C++ (compiled by nvcc's host compiler, g++): a
  # static link needs libstdc++, which the shared library records itself.
  target_link_libraries(pipewright_cuda_static PUBLIC pipewright_static PRIVATE ${_pw_cuda_deps} stdc++)
  foreach(tgt pipewright_cuda_shared pipewright_cuda_static)
    # backend.h's example registers the backend under #ifdef PW_HAVE_CUDA.
    target_compile_definitions(${tgt} INTERFACE PW_HAVE_CUDA=1)
  endforeach()
  install(TARGETS pipewright_cuda_shared pipewright_cuda_static EXPORT pipewrightCudaTargets
          LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT cuda
          ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT cuda)
  pw_install_headers(cuda ${PW_CUDA_PUBLIC_HEADERS})
  install(EXPORT pipewrightCudaTargets NAMESPACE pipewright::
          DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pipewright COMPONENT cuda)
endif()

# ---------------------------------------------------------------- pkg-config
# The .pc files name the prefix given at install time (`cmake --install
# --prefix P` may differ from CMAKE_INSTALL_PREFIX), so they are configured
# twice: here with everything the build knows, and at install time with
# the prefix (cmake/pipewright.pc.in's @PW_INSTALL_PREFIX@).
function(pw_install_pc name component)
  set(PW_PC_PREFIX "@PW_INSTALL_PREFIX@")
  configure_file(cmake/${name}.pc.in ${CMAKE_CURRENT_BINARY_DIR}/${name}.pc.in @ONLY)
  install(CODE "
    set(PW_INSTALL_PREFIX \"\${CMAKE_INSTALL_PREFIX}\")
    configure_file(\"${CMAKE_CURRENT_BINARY_DIR}/${name}.pc.in\" \"${CMAKE_CURRENT_BINARY_DIR}/${name}.pc\" @ONLY)
    file(INSTALL \"${CMAKE_CURRENT_BINARY_DIR}/${name}.pc\"
         DESTINATION \"\${CMAKE_INSTALL_PREFIX}/${CMAKE_INSTALL_LIBDIR}/pkgconfig\")"
    COMPONENT ${component})
endfunction()

# What a static link needs beyond libpipewright.a. The BLAS is the one the
# build found; MPI is named by its own .pc file when it has one (Open MPI's
# ompi-c, MPICH's mpich), else by its libraries.
if(PW_BLAS_NAME STREQUAL "OpenBLAS")
  set(PW_BLAS_PC openblas)
else()
  set(PW_BLAS_PC blis)
endif()
set(PW_PC_REQUIRES_PRIVATE "libevent_pthreads, jansson, zlib, ${PW_BLAS_PC}")
set(PW_PC_LIBS_PRIVATE "-lm -pthread")
if(PW_MPI)
  set(_pw_mpi_pc "")
  foreach(pc ompi-c mpich)
    pkg_check_modules(_pw_mpi_${pc} QUIET ${pc})
    if(_pw_mpi_${pc}_FOUND)
      set(_pw_mpi_pc ${pc})
      break()
    endif()
  endforeach()
  if(_pw_mpi_pc)
    string(APPEND PW_PC_REQUIRES_PRIVATE ", ${_pw_mpi_pc}")
  else()
    foreach(lib ${MPI_C_LIBRARIES})
      string(APPEND PW_PC_LIBS_PRIVATE " ${lib}")
    endforeach()
  endif()
endif()
pw_install_pc(pipewright Unspecified)
if(PW_CUDA)
  set(PW_PC_CUDA_LIBS_PRIVATE "-L${CUDAToolkit_LIBRARY_DIR} -lcudart -lcublas -lcublasLt")
  if(PW_NCCL_INCLUDE_DIR AND PW_NCCL_LIBRARY)
    string(APPEND PW_PC_CUDA_LIBS_PRIVATE " ${PW_NCCL_LIBRARY}")
  endif()
  string(APPEND PW_PC_CUDA_LIBS_PRIVATE " -lstdc++")
  pw_install_pc(pipewright-cuda cuda)
endif()

# ---------------------------------------------------------------- CMake package
set(_pw_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/pipewright)
install(EXPORT pipewrightTargets NAMESPACE pipewright:: DESTINATION ${_pw_cmake_dir})
configure_package_config_file(cmake/pipewrightConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/pipewrightConfig.cmake INSTALL_DESTINATION ${_pw_cmake_dir})
# 0.x: a minor version may break the API, so only the same minor matches.
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/pipewrightConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/pipewrightConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/pipewrightConfigVersion.cmake
        DESTINATION ${_pw_cmake_dir})

pw_report("library" ON "libpipewright.so.${PROJECT_VERSION} + libpipewright.a, pipewright.pc, find_package(pipewright)")
