-- Argo CD health of a K2Serving (k2.ai), from the status the k2 operator writes.
-- Suspended while spec.suspend is true; Degraded when a group that was ready is down (or nothing can serve once the
-- rollout is complete); Progressing while groups start or roll; Healthy when available. Applying a new expert
-- placement (Rebalancing) keeps a serving Healthy: it serves throughout, and the message says so.
-- Written for Argo CD's Lua 5.1 (gopher-lua); `obj` is the resource.

local function condition(status, kind)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function describe(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local hs = {}
local status = obj.status or {}
local generation = obj.metadata.generation
if status.observedGeneration == nil or (generation ~= nil and status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local available = condition(status, "Available")
local progressing = condition(status, "Progressing")
local degraded = condition(status, "Degraded")
local rebalancing = condition(status, "Rebalancing")

if (obj.spec ~= nil and obj.spec.suspend == true) or (available ~= nil and available.reason == "Suspended") then
  hs.status = "Suspended"
  hs.message = "Suspended: spec.suspend is true"
elseif is_true(degraded) then
  hs.status = "Degraded"
  hs.message = "Degraded: " .. describe(degraded, "groups are not ready")
elseif is_true(progressing) then
  hs.status = "Progressing"
  hs.message = "Progressing: " .. describe(progressing, "groups are starting")
elseif is_true(available) then
  hs.status = "Healthy"
  hs.message = "Available: " .. describe(available, "serving")
  if is_true(rebalancing) then
    hs.message = hs.message .. "; rebalancing: " .. describe(rebalancing, "applying a new placement")
  end
elseif available ~= nil then
  hs.status = "Degraded"
  hs.message = "Not available (" .. tostring(available.reason) .. "): " .. describe(available, "no group serves")
else
  hs.status = "Progressing"
  hs.message = "Waiting for the operator's status"
end
return hs
