#include "router/membership.h"

#include "gtest/gtest.h"

namespace expertmesh::router {
namespace {

using base::FakeClock;

MemberSpec Spec(WorkerKind kind, std::string address) {
  MemberSpec s;
  s.kind = kind;
  s.address = std::move(address);
  s.capacity.set_devices(1);
  return s;
}

constexpr absl::Duration kTtl = absl::Seconds(3);

TEST(MembershipTest, RegisterListsAliveMembersWithCapacity) {
  FakeClock clock;
  Membership m(clock, kTtl);
  MemberSpec spec = Spec(expertmesh::v1::WORKER_KIND_EXPERT, "127.0.0.1:5001");
  spec.capacity.set_max_experts(64);
  auto a = m.Register(spec);
  auto b = m.Register(Spec(expertmesh::v1::WORKER_KIND_ATTENTION, "127.0.0.1:5002"));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(a->worker_id, b->worker_id);
  EXPECT_EQ(a->replaced_worker_id, 0u);
  auto all = m.List();
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].worker_id, a->worker_id);
  EXPECT_EQ(all[0].spec.capacity.max_experts(), 64u);
  EXPECT_EQ(all[0].state, expertmesh::v1::MEMBER_STATE_ALIVE);
  EXPECT_EQ(m.List(expertmesh::v1::WORKER_KIND_ATTENTION).size(), 1u);
  EXPECT_EQ(m.List(expertmesh::v1::WORKER_KIND_KV_STORE).size(), 0u);
}

TEST(MembershipTest, RejectsBadSpecs) {
  FakeClock clock;
  Membership m(clock, kTtl);
  EXPECT_EQ(m.Register(Spec(expertmesh::v1::WORKER_KIND_UNSPECIFIED, "a:1")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m.Register(Spec(expertmesh::v1::WORKER_KIND_EXPERT, "")).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(MembershipTest, RenewKeepsTheLeaseAndSilenceExpiresIt) {
  FakeClock clock;
  Membership m(clock, kTtl);
  auto a = m.Register(Spec(expertmesh::v1::WORKER_KIND_EXPERT, "h:1"));
  auto b = m.Register(Spec(expertmesh::v1::WORKER_KIND_EXPERT, "h:2"));
  ASSERT_TRUE(a.ok() && b.ok());
  // Renew a every second for 10 s; b stays silent.
  for (int i = 0; i < 10; ++i) {
    clock.Advance(absl::Seconds(1));
    ASSERT_TRUE(m.Renew(a->worker_id, "h:1").ok());
    auto expired = m.ExpireLeases();
    if (i < 2) {
      EXPECT_TRUE(expired.empty()) << i;
    } else if (i == 2) {
      ASSERT_EQ(expired.size(), 1u);  // exactly at the TTL
      EXPECT_EQ(expired[0].worker_id, b->worker_id);
    }
  }
  auto members = m.List();
  ASSERT_EQ(members.size(), 1u);
  EXPECT_EQ(members[0].worker_id, a->worker_id);
  EXPECT_EQ(m.Renew(b->worker_id, "h:2").code(), absl::StatusCode::kNotFound);
}

TEST(MembershipTest, SuspectAfterHalfTheLease) {
  FakeClock clock;
  Membership m(clock, kTtl);
  ASSERT_TRUE(m.Register(Spec(expertmesh::v1::WORKER_KIND_KV_STORE, "h:1")).ok());
  clock.Advance(kTtl / 2);
  EXPECT_EQ(m.List()[0].state, expertmesh::v1::MEMBER_STATE_ALIVE);
  clock.Advance(absl::Milliseconds(1));
  EXPECT_EQ(m.List()[0].state, expertmesh::v1::MEMBER_STATE_SUSPECT);
  auto counts = m.Counts();
  EXPECT_EQ((counts[{expertmesh::v1::WORKER_KIND_KV_STORE, expertmesh::v1::MEMBER_STATE_SUSPECT}]),
            1);
  EXPECT_EQ(m.List()[0].lease_remaining, kTtl / 2 - absl::Milliseconds(1));
  // An expired lease is invisible even before the reaper runs, and cannot be renewed.
  clock.Advance(kTtl);
  EXPECT_TRUE(m.List().empty());
  EXPECT_EQ(m.Renew(1, "h:1").code(), absl::StatusCode::kNotFound);
}

TEST(MembershipTest, ReRegisterAfterExpiryGetsANewId) {
  FakeClock clock;
  Membership m(clock, kTtl);
  auto first = m.Register(Spec(expertmesh::v1::WORKER_KIND_EXPERT, "h:1"));
  ASSERT_TRUE(first.ok());
  clock.Advance(kTtl + absl::Seconds(1));
  EXPECT_EQ(m.ExpireLeases().size(), 1u);
  auto second = m.Register(Spec(expertmesh::v1::WORKER_KIND_EXPERT, "h:1"));
  ASSERT_TRUE(second.ok());
  EXPECT_NE(second->worker_id, first->worker_id);
  EXPECT_EQ(second->replaced_worker_id, 0u);
  EXPECT_EQ(m.Renew(first->worker_id, "h:1").code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(m.Renew(second->worker_id, "h:1").ok());
}

TEST(MembershipTest, DuplicateAddressReplacesSameKindAndRejectsOtherKind) {
  FakeClock clock;
  Membership m(clock, kTtl);
  auto first = m.Register(Spec(expertmesh::v1::WORKER_KIND_EXPERT, "h:1"));
  ASSERT_TRUE(first.ok());
  auto again = m.Register(Spec(expertmesh::v1::WORKER_KIND_EXPERT, "h:1"));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->replaced_worker_id, first->worker_id);
  EXPECT_EQ(m.List().size(), 1u);
  EXPECT_EQ(m.Renew(first->worker_id, "h:1").code(), absl::StatusCode::kNotFound);
  auto other = m.Register(Spec(expertmesh::v1::WORKER_KIND_ATTENTION, "h:1"));
  EXPECT_EQ(other.status().code(), absl::StatusCode::kAlreadyExists);
}

TEST(MembershipTest, IdOfAnotherAddressIsNotFound) {
  FakeClock clock;
  Membership m(clock, kTtl);
  auto a = m.Register(Spec(expertmesh::v1::WORKER_KIND_EXPERT, "h:1"));
  ASSERT_TRUE(a.ok());
  // A worker of an earlier router incarnation that happens to hold the same id.
  EXPECT_EQ(m.Renew(a->worker_id, "h:9").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m.Deregister(a->worker_id, "h:9").status().code(), absl::StatusCode::kNotFound);
  auto kind = m.Deregister(a->worker_id, "h:1");
  ASSERT_TRUE(kind.ok());
  EXPECT_EQ(*kind, expertmesh::v1::WORKER_KIND_EXPERT);
  EXPECT_TRUE(m.List().empty());
}

TEST(MembershipTest, PicksLeastLoadedAliveAttentionWorkerAndRotatesAmongEquals) {
  FakeClock clock;
  Membership m(clock, kTtl);
  EXPECT_EQ(m.PickAttentionWorker().status().code(), absl::StatusCode::kUnavailable);
  auto a = m.Register(Spec(expertmesh::v1::WORKER_KIND_ATTENTION, "h:1"));
  auto b = m.Register(Spec(expertmesh::v1::WORKER_KIND_ATTENTION, "h:2"));
  ASSERT_TRUE(m.Register(Spec(expertmesh::v1::WORKER_KIND_EXPERT, "h:3")).ok());
  auto p1 = m.PickAttentionWorker();
  auto p2 = m.PickAttentionWorker();
  ASSERT_TRUE(p1.ok() && p2.ok());
  EXPECT_NE(p1->worker_id, p2->worker_id);
  expertmesh::v1::LoadReport busy;
  busy.set_active_sequences(5);
  ASSERT_TRUE(m.ReportLoad(a->worker_id, "h:1", busy).ok());
  for (int i = 0; i < 3; ++i) EXPECT_EQ(m.PickAttentionWorker()->worker_id, b->worker_id);
  // b goes quiet past half its lease: the busier but alive a is preferred.
  clock.Advance(kTtl / 2 + absl::Milliseconds(1));
  ASSERT_TRUE(m.Renew(a->worker_id, "h:1").ok());
  EXPECT_EQ(m.PickAttentionWorker()->worker_id, a->worker_id);
}

}  // namespace
}  // namespace expertmesh::router
