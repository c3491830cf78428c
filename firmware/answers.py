# The gateway's answers on a meter's ack and nack topics, for both uplinks (MQTT
# and serial): {"seq": S} acks readings (DESIGN section 4), {"alert_seq": S}
# acks alerts (docs/alerts.md), {"eseq": E} signed events (docs/journal.md); a
# nack adds "reason". Alerts and events share the reading topics so a meter
# needs no subscription beyond ack and nack.
import json


def handle(payload, is_ack, on_ack, alerts, log, on_event=None):
    # Returns the reading seq an ack confirmed, or None. on_event(eseq, reason):
    # reason None for an ack.
    try:
        body = json.loads(payload)
        if "eseq" in body:
            if on_event is not None:
                on_event(body["eseq"], None if is_ack else body.get("reason"))
            return None
        if "alert_seq" in body:
            seq = body["alert_seq"]
            if alerts is None:
                return None
            if is_ack:
                alerts.acked(seq)
            else:
                alerts.refused(seq, body.get("reason"))
            return None
        seq = body["seq"]
    except Exception:
        log("bad_ack", ack=is_ack)
        return None
    if is_ack:
        on_ack(seq)
        return seq
    log("nack", seq=seq, reason=body.get("reason"))
    return None
