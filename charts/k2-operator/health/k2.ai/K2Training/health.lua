-- Argo CD health of a K2Training (k2.ai), from the status the k2 operator writes.
-- Succeeded is Healthy and Failed is Degraded (both terminal); a suspended training is Suspended; a gang being
-- restarted or still waiting for its workers is Progressing; every worker ready is Healthy.
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

local failed = condition(status, "Failed")
local succeeded = condition(status, "Succeeded")
local suspended = condition(status, "Suspended")
local restarting = condition(status, "Restarting")
local running = condition(status, "Running")

if is_true(failed) then
  hs.status = "Degraded"
  hs.message = "Failed: " .. describe(failed, "the training failed")
elseif is_true(succeeded) then
  hs.status = "Healthy"
  hs.message = "Succeeded: every worker finished spec.steps"
  if succeeded.message ~= nil and succeeded.message ~= "" then
    hs.message = "Succeeded: " .. succeeded.message
  end
elseif is_true(suspended) then
  hs.status = "Suspended"
  hs.message = "Suspended: spec.suspend is true"
elseif is_true(restarting) then
  hs.status = "Progressing"
  hs.message = "Restarting: " .. describe(restarting, "the gang is being recreated")
elseif is_true(running) then
  hs.status = "Healthy"
  hs.message = "Running: " .. describe(running, "every worker is ready")
else
  hs.status = "Progressing"
  hs.message = "Waiting for workers: " .. describe(running, "no status yet")
end
return hs
