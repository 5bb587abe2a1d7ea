"""HTTP for the LLM judge: one JSON POST, retried with bounded backoff, that follows no redirect, so
an API key goes to the address it was given and nowhere else."""
import json
import time
import urllib.error
import urllib.request


class RedirectRefused(Exception):
    """The endpoint answered with a redirect (post_json follows none)."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        fp.close()
        raise RedirectRefused(f"{req.full_url} answered {code}, a redirect to {newurl}: refused (the key is sent to "
                              "--judge_url only; set --judge_url to the address that answers)")


def post_json(url, payload, key=None, retries=3, timeout=60.0):
    """POST `payload` as JSON (with `Authorization: Bearer key` if given); returns (decoded JSON reply,
    None), or (None, why) when every try failed (connection or HTTP error, malformed JSON). A
    redirect, to another host or the same one, is refused at once and not retried: urllib would
    re-send the Authorization header to the new address (and turn the POST into a GET)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    opener, last = urllib.request.build_opener(_RefuseRedirects), None
    for attempt in range(retries + 1):
        try:
            with opener.open(urllib.request.Request(url, json.dumps(payload).encode(), headers), timeout=timeout) as r:
                return json.loads(r.read()), None
        except RedirectRefused as e:
            return None, str(e)
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = e
            if attempt < retries:
                time.sleep(min(30.0, 2.0 ** attempt))
    return None, f"request failed after {retries + 1} tries ({last})"


def chat_completion(base_url, model, messages, key=None, retries=3, timeout=60.0):
    """One OpenAI-compatible chat-completions request at temperature 0 (post_json's retries and
    redirect rule). Returns (the answer's text, None), or (None, why) when there is none."""
    reply, why = post_json(base_url.rstrip("/") + "/chat/completions", {"model": model, "temperature": 0, "messages": messages},
                           key, retries, timeout)
    try:
        return (reply["choices"][0]["message"]["content"], None) if reply is not None else (None, why)
    except (KeyError, IndexError, TypeError) as e:
        return None, f"an answer without choices[0].message.content ({e!r})"
