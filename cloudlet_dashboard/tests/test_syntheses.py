"""The Syntheses panel and its timeline. The SDK is faked at the API wrapper
(cloudlet_dashboard.api.cloudlet)."""

from __future__ import annotations

from typing import Any

from django.urls import reverse

from cloudlet_dashboard.api import cloudlet
from cloudlet_dashboard.test import helpers

INDEX_URL = reverse("horizon:project:cloudlet_syntheses:index")


def statistics(**fields: Any) -> dict[str, Any]:
    """The `statistics` of a synthesis as cloudlet-api reports it (CONTRACTS.md): stages in
    start order, overlapping where early start pipelines them."""
    values = {
        "state": "done",
        "error": None,
        "started_at": "2026-12-08T00:00:01Z",
        "stages": [
            {
                "name": "fetch",
                "start": 0.0,
                "end": 1.5,
                "seconds": 1.5,
                "bytes": 4 << 20,
                "failed": False,
            },
            {
                "name": "apply overlay",
                "start": 0.4,
                "end": 2.0,
                "seconds": 1.6,
                "bytes": 0,
                "failed": False,
            },
            {
                "name": "restore",
                "start": 2.0,
                "end": 3.25,
                "seconds": 1.25,
                "bytes": 0,
                "failed": False,
            },
        ],
        "counters": {
            "frames fetched on demand": 3,
            "overlay complete after s": 4.5,
            "cloudletfs reads": 120,
        },
    }
    values.update(fields)
    return values


class SynthesesIndexTests(helpers.TestCase):
    def test_index_shows_state_and_stage(self) -> None:
        running = helpers.synthesis(name="app-1", stage="spawning", progress=0.5)
        failed = helpers.synthesis(name="app-2", state="failed", error="needs another base VM")
        done = helpers.synthesis(name="app-3", state="succeeded")
        self.patch_api("synthesis_list", return_value=[running, failed, done])
        res = self.client.get(INDEX_URL)
        self.assertEqual(res.status_code, 200)
        self.assertContains(res, 'id="syntheses"')
        self.assertContains(res, "spawning (50%)")
        self.assertContains(res, "needs another base VM")
        status = {r.datum.name: r.cells["status"].data for r in res.context["table"].get_rows()}
        self.assertEqual(status, {"app-1": "Running", "app-2": "Error", "app-3": "Active"})

    def test_row_update_follows_a_running_synthesis(self) -> None:
        running = helpers.synthesis(stage="spawning", progress=0.5)
        self.patch_api("synthesis_get", return_value=running)
        url = f"{INDEX_URL}?action=row_update&table=syntheses&obj_id={running.id}"
        res = self.client.get(url, HTTP_X_REQUESTED_WITH="XMLHttpRequest")
        self.assertContains(res, f'id="syntheses__row__{running.id}"')
        self.assertContains(res, "spawning (50%)")
        self.assertContains(res, "data-update-interval")

    def test_refusal_shows_its_message(self) -> None:
        self.patch_api("synthesis_list", side_effect=cloudlet.CloudletError("no token scope"))
        res = self.client.get(INDEX_URL)
        self.assertContains(res, "Unable to retrieve syntheses: no token scope")


class SynthesisDetailTests(helpers.TestCase):
    def detail(self, synthesis: Any) -> Any:
        self.patch_api("synthesis_get", return_value=synthesis)
        return self.client.get(
            reverse("horizon:project:cloudlet_syntheses:detail", args=[synthesis.id])
        )

    def test_timeline_draws_each_stage_from_start_to_end(self) -> None:
        synthesis = helpers.synthesis(state="succeeded")
        synthesis.statistics = statistics()
        res = self.detail(synthesis)
        self.assertEqual(res.status_code, 200)
        self.assertContains(res, 'id="synthesis-timeline"')
        self.assertContains(
            res,
            'class="stage-bar" data-stage="fetch" data-start="0.000" data-end="1.500" '
            'data-seconds="1.500"',
        )
        self.assertContains(res, 'data-stage="apply overlay" data-start="0.400"')
        self.assertContains(res, "1.25 s")
        timeline = res.context["timeline"]
        # bars on one time axis (3.25 s wide): the overlapping stages overlap
        fetch, apply, restore = timeline.bars
        self.assertLess(apply.x, fetch.end)
        self.assertAlmostEqual(restore.end, timeline.label_width + 640)
        self.assertEqual(
            [t.label for t in timeline.ticks], ["0.00 s", "0.81 s", "1.62 s", "2.44 s", "3.25 s"]
        )
        self.assertContains(res, 'id="synthesis-early-start"')
        self.assertContains(res, "frames fetched on demand")
        self.assertNotContains(res, "data-cloudlet-refresh")

    def test_no_statistics_yet_is_said_and_no_chart_drawn(self) -> None:
        res = self.detail(helpers.synthesis(state="running"))
        self.assertContains(res, 'id="synthesis-no-statistics"')
        self.assertContains(res, "No statistics yet")
        self.assertNotContains(res, "<svg")
        self.assertContains(res, 'data-cloudlet-refresh="5000"')

    def test_a_record_without_finished_stages_draws_no_chart(self) -> None:
        synthesis = helpers.synthesis(state="running")
        synthesis.statistics = statistics(state="running", stages=[], counters={})
        res = self.detail(synthesis)
        self.assertContains(res, "No stage has started yet")
        self.assertNotContains(res, "<svg")

    def test_a_running_stage_reaches_to_the_latest_moment(self) -> None:
        synthesis = helpers.synthesis(state="running")
        synthesis.statistics = statistics(
            state="running",
            stages=[
                {
                    "name": "fetch base",
                    "start": 0.0,
                    "end": 0.5,
                    "seconds": 0.5,
                    "bytes": 0,
                    "failed": False,
                },
                {
                    "name": "apply overlay",
                    "start": 0.75,
                    "end": None,
                    "seconds": 0.0,
                    "bytes": 0,
                    "failed": False,
                },
                {
                    "name": "open + verify manifest",
                    "start": 0.8,
                    "end": None,
                    "seconds": 0.0,
                    "bytes": 0,
                    "failed": False,
                },
            ],
        )
        res = self.detail(synthesis)
        self.assertContains(
            res, 'data-stage="apply overlay" data-start="0.750" data-end="" data-seconds="0.000"'
        )
        fetch, apply, verify = res.context["timeline"].bars
        right = res.context["timeline"].label_width + 640  # the latest moment known: 0.8 s
        self.assertAlmostEqual(apply.end, right)
        self.assertAlmostEqual(verify.end, right + 1)  # started just now: a 1-unit sliver
        self.assertAlmostEqual(fetch.end, res.context["timeline"].label_width + 640 * 0.5 / 0.8)
        self.assertContains(res, "running</text>")
        self.assertContains(res, 'data-cloudlet-refresh="5000"')

    def test_failure_shows_the_hosts_message(self) -> None:
        synthesis = helpers.synthesis(state="failed", error="no usable base memory image")
        synthesis.statistics = statistics(
            state="failed",
            error="no usable base memory image",
            stages=[
                {
                    "name": "fetch",
                    "start": 0.0,
                    "end": 0.5,
                    "seconds": 0.5,
                    "bytes": 0,
                    "failed": True,
                }
            ],
        )
        res = self.detail(synthesis)
        self.assertContains(res, 'id="synthesis-error"')
        self.assertContains(res, "no usable base memory image")
        self.assertContains(res, 'fill="#d9534f"')

    def test_an_invisible_synthesis_goes_back_with_the_message(self) -> None:
        self.patch_api("synthesis_get", side_effect=cloudlet.CloudletError("not found", 404))
        res = self.client.get(reverse("horizon:project:cloudlet_syntheses:detail", args=["x"]))
        self.assertRedirectsNoFollow(res, INDEX_URL)
