#!/bin/sh
# ptychopv scan macro: capture a scan, reconstruct it, train on it, report the new model.
#
# Expects EPICS base's command-line tools on PATH: caget and caput (Channel Access, for the
# ptychopv IOC) and pvget/pvput (PV Access, for a detector whose Acquire is a PVA PV, such as
# `ptychopv sim`). With an areaDetector IOC on CA, set DET_PUT="caput -c", DET_GET="caget -t",
# DET to its cam prefix (e.g. 13SIM1:cam1:, where Acquire lives) and NFRAMES (areaDetector has no
# NumFrames_RBV). The messages and file names are long strings (char arrays over CA): caget -S.
#
# Settings (environment):
#   P         ptychopv IOC prefix                      (default PTYCHO:)
#   DET       detector prefix; Acquire, NumFrames_RBV  (default PTYSIM:, ptychopv sim's)
#   NFRAMES   frames in the scan (default: read ${DET}NumFrames_RBV)
#   TIMEOUT   seconds to wait for the scan to be captured (default 300)
#   JOB_TIMEOUT  seconds caput -c waits for a reconstruction or a training (default 3600): caput
#             waits -w seconds (EPICS_CLI_TIMEOUT, else 1) for a put-callback, and one that has not
#             come by then is only said on stderr, the exit status 0
#   EPICS_CA_ADDR_LIST / EPICS_PVA_NAME_SERVERS as usual for the tools.
set -eu

P=${P:-PTYCHO:}
DET=${DET:-PTYSIM:}
TIMEOUT=${TIMEOUT:-300}
JOB_TIMEOUT=${JOB_TIMEOUT:-3600}
DET_PUT=${DET_PUT:-pvput}
DET_GET=${DET_GET:-pvget}

# the last field of a pvget/caget line is the value ("NAME [timestamp] VALUE")
det_get() { $DET_GET "$1" | tail -n 1 | awk '{print $NF}'; }

NFRAMES=${NFRAMES:-$(det_get "${DET}NumFrames_RBV")}
VERSION0=$(caget -t "${P}ModelVersion_RBV")
echo "macro: model version ${VERSION0}; capturing ${NFRAMES} frames from ${DET}"

MISSED0=$(caget -t "${P}Infer:MissedFrames_RBV")
caput -c -w "$TIMEOUT" "${P}Scan:Capture" 1 >/dev/null
$DET_PUT "${DET}Acquire" 1 >/dev/null
# the recorder counts frames as they arrive; stop recording once every frame is in or known lost
# on the way (a uniqueId gap, Infer:MissedFrames_RBV): a lost frame never arrives
waited=0
while :; do
    CAPTURED=$(caget -t "${P}Scan:FramesCaptured_RBV")
    LOST=$(( $(caget -t "${P}Infer:MissedFrames_RBV") - MISSED0 ))
    [ $((CAPTURED + LOST)) -ge "$NFRAMES" ] && break
    if [ "$waited" -ge "$TIMEOUT" ]; then
        echo "macro: scan not captured within ${TIMEOUT} s (${CAPTURED} of ${NFRAMES} recorded, ${LOST} lost)" >&2
        caput -c -w "$TIMEOUT" "${P}Scan:Capture" 0 >/dev/null
        exit 2
    fi
    sleep 1
    waited=$((waited + 1))
done
if [ "$LOST" -gt 0 ]; then
    echo "macro: ${LOST} of ${NFRAMES} frames lost on the way (Infer:MissedFrames_RBV); the scan has ${CAPTURED}"
fi
caput -c -w "$TIMEOUT" "${P}Scan:Capture" 0 >/dev/null   # completes when the file is closed
echo "macro: scan file $(caget -t -S "${P}Scan:FileName_RBV")"

caput -c -w "$JOB_TIMEOUT" "${P}Recon:Start" 1 >/dev/null   # completes when reconstructed, labelled, validated
STATUS=$(caget -t "${P}Recon:Status_RBV")
echo "macro: recon ${STATUS}: $(caget -t -S "${P}Recon:Message_RBV") SSIM $(caget -t "${P}SSIM_RBV")"
[ "$STATUS" = "Done" ] || exit 3

caput -c -w "$JOB_TIMEOUT" "${P}Train:Start" 1 >/dev/null   # completes when the new version is registered
STATUS=$(caget -t "${P}Train:Status_RBV")
echo "macro: train ${STATUS}: $(caget -t -S "${P}Train:Message_RBV")"
[ "$STATUS" = "Done" ] || exit 4

# the chain loads the new version on its own; wait for it to go live
# (a read that fails or says no number is not a new version: in the loop's test it ended the
# loop, and the macro said success)
waited=0
while :; do
    VERSION=$(caget -t "${P}ModelVersion_RBV" 2>/dev/null || true)
    case "$VERSION" in
        ''|*[!0-9]*) ;;
        *) [ "$VERSION" -gt "$VERSION0" ] && break ;;
    esac
    if [ "$waited" -ge "$TIMEOUT" ]; then
        echo "macro: no new model version live within ${TIMEOUT} s (ModelVersion_RBV read '${VERSION}')" >&2
        exit 5
    fi
    sleep 1
    waited=$((waited + 1))
done
echo "macro: ModelVersion_RBV ${VERSION}"
