# Writes OUT (a header defining TRELLM_GIT_COMMIT) from `git rev-parse --short HEAD`, only when it changed, so
# figures written by the benchmark programs name the commit they were built from (not the configure-time one).
execute_process(COMMAND git rev-parse --short HEAD WORKING_DIRECTORY ${SRC}
                OUTPUT_VARIABLE c OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
execute_process(COMMAND git status --porcelain --untracked-files=no WORKING_DIRECTORY ${SRC}
                OUTPUT_VARIABLE dirty OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
if(NOT c)
  set(c unknown)
elseif(dirty)
  set(c "${c}-dirty")
endif()
set(text "#pragma once\n#define TRELLM_GIT_COMMIT \"${c}\"\n")
if(EXISTS ${OUT})
  file(READ ${OUT} old)
endif()
if(NOT "${old}" STREQUAL "${text}")
  file(WRITE ${OUT} "${text}")
endif()
