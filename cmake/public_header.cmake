# Copies one public header into the build's include/pipewright/ tree with
# its quoted #includes made relative to its own directory, so the installed
# headers need only -I PREFIX/include (cmake/package.cmake):
#
#   graph/graph.h:        #include "runtime/status.h"  ->  #include "../runtime/status.h"
#   stages/ops/cuda/device.h: #include "runtime/status.h"  ->  #include "../../runtime/status.h"
#   pipewright.h:         unchanged (it sits at the root)
#
# Only lines that start with #include change; comments and the rest are
# copied as they are. A quoted #include of a header that is not public (not
# in LIST) stops the build: the installed header could not find it.
#
#   cmake -DIN=src/graph/graph.h -DNAME=graph/graph.h -DOUT=build/include/pipewright/graph/graph.h
#         -DLIST=build/pipewright-public-headers.txt -P cmake/public_header.cmake
cmake_policy(VERSION 3.20) # IN_LIST
foreach(var IN ITEMS IN NAME OUT LIST)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "public_header.cmake: -D${var}=... is missing")
  endif()
endforeach()

file(READ "${IN}" text)
file(STRINGS "${LIST}" public)
set(text "\n${text}") # so that an #include on the first line starts with \n too

get_filename_component(dir "${NAME}" DIRECTORY)
set(up "")
if(dir)
  string(REGEX MATCHALL "[^/]+" parts "${dir}")
  foreach(part IN LISTS parts)
    string(APPEND up "../")
  endforeach()
endif()

string(REGEX MATCHALL "\n#[ \t]*include[ \t]+\"[^\"]+\"" includes "${text}")
foreach(inc IN LISTS includes)
  string(REGEX REPLACE "^\n#[ \t]*include[ \t]+\"([^\"]+)\"$" "\\1" target "${inc}")
  if(NOT target IN_LIST public)
    message(FATAL_ERROR "${NAME} includes \"${target}\", which is not a public header: an "
            "installed header may include only installed ones (PW_PUBLIC_HEADERS in "
            "cmake/package.cmake; or include it from the .c file instead)")
  endif()
endforeach()

string(REGEX REPLACE "\n(#[ \t]*include[ \t]+)\"([^\"]+)\"" "\n\\1\"${up}\\2\"" text "${text}")
string(SUBSTRING "${text}" 1 -1 text)
file(WRITE "${OUT}" "${text}")
