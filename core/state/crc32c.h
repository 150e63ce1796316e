// CRC32C (Castagnoli, reflected polynomial 0x82F63B78, as in iSCSI and ext4): the one checksum
// of the state formats, the kv-store's blocks and its protocol (kv_store.proto's crc32c fields).
// Debian 12 ships no CRC32C library (abseil 20220623 predates absl/crc, libcrc32c-dev arrived
// after bookworm), so this is our own: the SSE4.2 crc32 instruction where the CPU has it
// (checked once at run time), a slicing-by-8 table otherwise. Both give the same bits.
// The instruction has a 3-cycle latency but accepts one per cycle, so a single dependency chain
// leaves two thirds of the unit idle: long inputs are cut into three adjacent blocks whose CRCs
// run as three independent chains and are then joined with a "shift by the block length"
// operator (a table per block length, built once at first use).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace expertmesh::state {

// CRC32C of `data` (initial value and final xor 0xFFFFFFFF, the standard check value of
// "123456789" is 0xE3069283).
uint32_t Crc32c(std::string_view data);

// The CRC32C of a + data given crc == Crc32c(a): checksums a message written in pieces.
uint32_t Crc32cExtend(uint32_t crc, std::string_view data);

namespace internal {
// The two implementations, on the raw (non-inverted) register, for the tests.
uint32_t Crc32cPortable(uint32_t reg, const uint8_t* p, size_t n);
// REQUIRES: HaveHardwareCrc32c().
uint32_t Crc32cHardware(uint32_t reg, const uint8_t* p, size_t n);
bool HaveHardwareCrc32c();
// The hardware path's three-stream block lengths in bytes (a stretch of 3 * length is processed
// per join; what is shorter than 3 * kCrc32cShortBlock goes through one chain): the tests aim
// lengths at these edges.
inline constexpr size_t kCrc32cLongBlock = 4096;
inline constexpr size_t kCrc32cShortBlock = 256;
}  // namespace internal

}  // namespace expertmesh::state
