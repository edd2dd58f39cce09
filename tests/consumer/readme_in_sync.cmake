# Fails unless README.md contains examples/readme.cpp verbatim (as its ```cpp block).
file(READ "${README}" readme)
file(READ "${EXAMPLE}" example)
string(FIND "${readme}" "```cpp\n${example}```" position)
if(position EQUAL -1)
  message(FATAL_ERROR "README.md's API example differs from ${EXAMPLE}: update one from the other")
endif()
