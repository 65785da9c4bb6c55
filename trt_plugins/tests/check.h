// Minimal assertion macros shared by the C++ plugin tests: a failed check is reported and counted,
// and the test binary's exit code comes from ouro_test::gFailures.
#pragma once

#include <cstdio>
#include <sstream>

namespace ouro_test
{
inline int gFailures = 0;
inline int gChecks = 0;
} // namespace ouro_test

#define CHECK(cond)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        ++ouro_test::gChecks;                                                                                          \
        if (!(cond))                                                                                                   \
        {                                                                                                              \
            ++ouro_test::gFailures;                                                                                    \
            std::fprintf(stderr, "  FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond);                                   \
        }                                                                                                              \
    } while (0)

#define CHECK_EQ(a, b)                                                                                                 \
    do                                                                                                                 \
    {                                                                                                                  \
        ++ouro_test::gChecks;                                                                                          \
        auto const va_ = (a);                                                                                          \
        auto const vb_ = (b);                                                                                          \
        if (!(va_ == vb_))                                                                                             \
        {                                                                                                              \
            ++ouro_test::gFailures;                                                                                    \
            std::ostringstream os_;                                                                                    \
            os_ << va_ << " != " << vb_;                                                                               \
            std::fprintf(stderr, "  FAILED %s:%d: %s == %s (%s)\n", __FILE__, __LINE__, #a, #b, os_.str().c_str());   \
        }                                                                                                              \
    } while (0)
